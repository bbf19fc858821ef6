//! The admin REST API under `/api/v1`: cluster status and membership, every node's
//! live figures, clients, sessions, subscriptions and shared groups, retained
//! messages, publishing, and this node's log filter (`GET`/`PUT /log/level`, changed
//! without a restart). JSON throughout; lists are paged in EMQX's
//! `{"data": [...], "meta": {"page", "limit", "count"}}` shape.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /cluster` | this node's Raft view: members and roles, leader, term, indexes, digest |
//! | `POST /cluster/join`, `POST /cluster/leave`, `DELETE /cluster/members/{id}` | membership changes |
//! | `POST /cluster/snapshot` | this node builds a Raft snapshot of its applied state now (and purges the log behind it); answered once it is built |
//! | `GET /stats` | this node's figures: counters, rates of the last minutes, forwarding per peer |
//! | `GET /cluster/stats` | the same of every member (asked over the cluster's Admin service) |
//! | `GET /clients`, `GET /sessions` | connected clients, all sessions (`clientid`, `like`, `node`, `connected`, paged) |
//! | `GET /clients/{id}`, `DELETE /clients/{id}` | one session in detail; kick |
//! | `GET /subscriptions` | subscriptions (`clientid`, `like`, paged) |
//! | `GET /shared` | shared subscription groups with their members |
//! | `GET /retained`, `GET /retained/{topic}`, `DELETE /retained/{topic}` | retained messages (`prefix`, `like`, paged) |
//! | `POST /publish` | publish as the broker |
//! | `GET /bridges` | the configured bridges: whether this node runs them, connected, messages and bytes each way, queue depth, reconnects, last error |
//!
//! Access ([`ApiAccess`]): with `api_token` or `api_password_file` set, every request
//! needs `Authorization: Bearer <token>` or HTTP basic auth as a user of that file (or
//! the dashboard's cookie holding the token); with neither, only requests from
//! loopback addresses are answered. Reads come from this node's applied replicated
//! state, so every node answers for the whole cluster; writes go through Raft (a kick
//! reaches the client on whichever node holds it).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::password::PasswordFile;
use crate::broker::{unix_ms, Broker};
use crate::cluster::command::{Command, CommandResult, Message, MessageProperties, NodeId};
use crate::cluster::membership::{self, MembershipChange};
use crate::cluster::network;
use crate::cluster::raft::Raft;
use crate::cluster::state::SessionRecord;
use crate::cluster::stats::StatsSource;

/// What the API works on, set once the node has started.
pub struct Api {
    /// The broker runtime.
    pub broker: Arc<Broker>,
    /// Raft, for status and membership changes.
    pub raft: Raft,
    /// The configured bridges and their figures.
    pub bridges: Arc<crate::bridge::Bridges>,
}

/// Where the router finds the [`Api`]; empty while the node starts.
pub type ApiSlot = Arc<OnceLock<Api>>;

/// Who may call the API: a bearer token, basic-auth users, both, or (neither set)
/// loopback clients only.
#[derive(Clone, Default)]
pub struct ApiAccess {
    /// The bearer token.
    pub token: Option<Arc<str>>,
    /// The basic-auth users, replaced whole on SIGHUP.
    pub users: Option<Arc<std::sync::RwLock<Arc<PasswordFile>>>>,
}

impl ApiAccess {
    /// Access by `token` and by the users of the password file at `users_path`.
    pub fn load(token: Option<&str>, users_path: Option<&str>) -> anyhow::Result<ApiAccess> {
        let users = match users_path {
            Some(path) => Some(Arc::new(std::sync::RwLock::new(Arc::new(
                PasswordFile::load(std::path::Path::new(path))?,
            )))),
            None => None,
        };
        Ok(ApiAccess {
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
            users,
        })
    }

    /// Read the password file at `path` again (SIGHUP); on error the users stay.
    pub fn reload_users(&self, path: &str) -> anyhow::Result<()> {
        if let Some(users) = &self.users {
            let fresh = PasswordFile::load(std::path::Path::new(path))?;
            *users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        }
        Ok(())
    }

    /// Whether a credential is required (otherwise only loopback clients get in).
    fn required(&self) -> bool {
        self.token.is_some() || self.users.is_some()
    }

    /// Whether a request from `peer` with `headers` may use the API and the dashboard.
    pub fn check(&self, peer: &SocketAddr, headers: &header::HeaderMap) -> Result<(), Refusal> {
        if self.required() {
            if self.admits_headers(headers) {
                Ok(())
            } else {
                Err(Refusal::Unauthenticated)
            }
        } else if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(Refusal::NotLoopback)
        }
    }

    /// Whether basic-auth users are configured (a browser is then asked for them).
    pub fn has_users(&self) -> bool {
        self.users.is_some()
    }

    /// Whether a bearer token is configured.
    pub fn token_configured(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `headers` carry a valid credential: an `Authorization` header, or the
    /// dashboard's cookie holding the bearer token.
    fn admits_headers(&self, headers: &header::HeaderMap) -> bool {
        let authorized = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| self.admits(v));
        authorized || token_cookie(headers).is_some_and(|given| self.admits_token(&given))
    }

    /// Whether `token` is the bearer token.
    pub fn admits_token(&self, token: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| constant_time_eq(token.as_bytes(), t.as_bytes()))
    }

    /// Whether an `Authorization` header value carries a valid credential.
    fn admits(&self, authorization: &str) -> bool {
        if let (Some(_), Some(given)) = (&self.token, authorization.strip_prefix("Bearer ")) {
            return self.admits_token(given);
        }
        let (Some(users), Some(encoded)) = (&self.users, authorization.strip_prefix("Basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        let Ok(user) = std::str::from_utf8(&decoded[..colon]) else {
            return false;
        };
        let users = users.read().unwrap_or_else(|e| e.into_inner()).clone();
        users.verify(user, &decoded[colon + 1..])
    }
}

/// The cookie in which the dashboard keeps the bearer token (base64url, so that any
/// token fits a cookie value).
pub const TOKEN_COOKIE: &str = "flockmq_token";

/// The token held in the dashboard's cookie, if the request carries one.
fn token_cookie(headers: &header::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value)
                .ok()
        })
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// The `Set-Cookie` value that keeps `token` for the dashboard: sent back only to
/// this server, never to scripts, never on a request from another site.
pub fn token_cookie_value(token: &str) -> String {
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.as_bytes());
    format!("{TOKEN_COOKIE}={encoded}; Path=/; HttpOnly; SameSite=Strict")
}

/// Why a request is not let in.
pub enum Refusal {
    /// A credential is required and none valid was given.
    Unauthenticated,
    /// No credential is configured and the request is not from loopback.
    NotLoopback,
}

#[derive(Clone)]
struct ApiState {
    slot: ApiSlot,
    access: ApiAccess,
}

/// The `/api/v1` routes.
pub fn router(slot: ApiSlot, access: ApiAccess) -> Router {
    let state = ApiState { slot, access };
    Router::new()
        .route("/cluster", get(cluster_status))
        .route("/cluster/join", post(cluster_join))
        .route("/cluster/leave", post(cluster_leave))
        .route("/cluster/snapshot", post(cluster_snapshot))
        .route("/cluster/members/{id}", delete(cluster_remove))
        .route("/cluster/stats", get(cluster_stats))
        .route("/stats", get(node_stats))
        .route("/shared", get(shared_list))
        .route("/clients", get(clients_list))
        .route("/clients/{id}", get(client_show).delete(client_kick))
        .route("/sessions", get(sessions_list))
        .route("/sessions/{id}", get(client_show))
        .route("/subscriptions", get(subscriptions_list))
        .route("/retained", get(retained_list))
        .route(
            "/retained/{*topic}",
            get(retained_get).delete(retained_delete),
        )
        .route("/publish", post(publish))
        .route("/bridges", get(bridges_list))
        .route("/log/level", get(log_level).put(set_log_level))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// `GET /log/level`: this node's log filter, `{"level": "info,openraft=warn"}`.
async fn log_level() -> ApiResult {
    let level = crate::logging::filter().map_err(unavailable)?;
    Ok(Json(json!({ "level": level })).into_response())
}

/// `PUT /log/level` with `{"level": "debug"}` (any tracing filter): in force on this
/// node at once, until the next change or restart.
async fn set_log_level(Json(body): Json<Value>) -> ApiResult {
    let Some(text) = body["level"].as_str() else {
        return Err(bad_request("want {\"level\": \"<filter>\"}"));
    };
    let level = crate::logging::set_filter(text).map_err(|e| match e {
        crate::logging::LogError::Invalid(..) => bad_request(e.to_string()),
        crate::logging::LogError::NotInstalled => unavailable(e),
    })?;
    Ok(Json(json!({ "level": level })).into_response())
}

/// An API error: a status and a message, as `{"code", "message"}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self
            .0
            .canonical_reason()
            .unwrap_or("ERROR")
            .to_uppercase()
            .replace(' ', "_");
        (self.0, Json(json!({ "code": code, "message": self.1 }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

fn bad_request(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, what.into())
}

fn unavailable(what: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, what.to_string())
}

/// Authentication, and the started node.
async fn guard(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    match state.access.check(&peer, request.headers()) {
        Ok(()) => {}
        Err(Refusal::Unauthenticated) => {
            let mut response = ApiError(
                StatusCode::UNAUTHORIZED,
                "a bearer token or basic-auth credentials are required".into(),
            )
            .into_response();
            if state.access.has_users() {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, BASIC_CHALLENGE);
            }
            return response;
        }
        Err(Refusal::NotLoopback) => {
            return ApiError(StatusCode::FORBIDDEN, NOT_LOOPBACK.into()).into_response();
        }
    }
    if state.slot.get().is_none() {
        return unavailable("the node is starting").into_response();
    }
    next.run(request).await
}

/// The challenge that has a browser ask for basic-auth credentials.
pub const BASIC_CHALLENGE: header::HeaderValue =
    header::HeaderValue::from_static("Basic realm=\"flockmq\"");

/// Why a request from off loopback is refused when no credential is configured.
pub const NOT_LOOPBACK: &str = "the admin API and the dashboard answer only loopback clients \
     unless api_token or api_password_file is set";

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn api(state: &ApiState) -> Result<&Api, ApiError> {
    state
        .slot
        .get()
        .ok_or_else(|| unavailable("the node is starting"))
}

/// Paging parameters and list filters.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    /// Only sessions connected (true) or not (false).
    connected: Option<bool>,
    /// Only sessions on this node.
    node: Option<NodeId>,
    /// Only this client (sessions, clients, subscriptions).
    clientid: Option<String>,
    /// Only client ids or topics containing this text.
    like: Option<String>,
    /// Only topics beginning with this text (retained messages).
    prefix: Option<String>,
}

/// Default and largest page size.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

fn paged(items: Vec<Value>, q: &ListQuery) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let page = q.page.unwrap_or(1).max(1);
    let count = items.len();
    let data: Vec<Value> = items
        .into_iter()
        .skip((page - 1).saturating_mul(limit))
        .take(limit)
        .collect();
    Json(json!({
        "data": data,
        "meta": { "page": page, "limit": limit, "count": count, "hasnext": page * limit < count },
    }))
    .into_response()
}

async fn cluster_status(State(state): State<ApiState>) -> ApiResult {
    let api = api(&state)?;
    // Off the async runtime: the digest walks the whole state.
    let state_handle = api.broker.state.clone();
    // `None` while the state changes faster than a walk completes.
    let digested = storage::io::blocking(move || state_handle.digest())
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("digest task failed: {e}"),
            )
        })?;
    let metrics = api.raft.metrics().borrow().clone();
    let members = membership::members(&api.raft);
    let nodes: Vec<Value> = members
        .nodes
        .iter()
        .map(|(id, addr)| {
            json!({
                "id": id,
                "addr": addr,
                "role": if metrics.current_leader == Some(*id) {
                    "leader"
                } else if members.voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                },
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": metrics.id,
        "state": format!("{:?}", metrics.state),
        "leader": metrics.current_leader,
        "term": metrics.current_term,
        "last_log_index": metrics.last_log_index,
        "last_applied_index": metrics.last_applied.map(|l| l.index),
        "snapshot_index": metrics.snapshot.map(|l| l.index),
        "digest_index": digested.map(|(index, _)| index),
        "digest": digested.map(|(_, digest)| format!("{digest:016x}")),
        "members": nodes,
        // The newest Raft entry format every member reads, as this node knows: lower
        // than this release's while a member runs an earlier one.
        "entry_format": api.broker.state.readable_format(),
        "sessions": api.broker.read_state(|s| s.sessions().count()),
        "connections_here": api.broker.local_client_count(),
    }))
    .into_response())
}

/// How long the figures of one peer are waited for.
const PEER_STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn bridges_list(State(state): State<ApiState>) -> ApiResult {
    use std::sync::atomic::Ordering::Relaxed;
    let api = api(&state)?;
    let data: Vec<Value> = api
        .bridges
        .list
        .iter()
        .map(|b| {
            let c = &b.config;
            json!({
                "name": c.name,
                "node": api.broker.node_id,
                "address": c.address,
                "protocol": c.protocol,
                "tls": c.tls,
                "running": b.running.load(Relaxed),
                "connected": b.connected.load(Relaxed),
                "messages_out": b.messages_out.load(Relaxed),
                "bytes_out": b.bytes_out.load(Relaxed),
                "messages_in": b.messages_in.load(Relaxed),
                "bytes_in": b.bytes_in.load(Relaxed),
                "queued": b.queued.load(Relaxed),
                "reconnects": b.reconnects.load(Relaxed),
                "last_error": b.last_error.lock().ok().and_then(|e| e.clone()),
            })
        })
        .collect();
    let count = data.len();
    Ok(
        Json(json!({ "data": data, "meta": { "page": 1, "limit": count, "count": count } }))
            .into_response(),
    )
}

async fn node_stats(State(state): State<ApiState>) -> ApiResult {
    let api = api(&state)?;
    Ok(Json(api.broker.node_stats()).into_response())
}

/// Every member's figures, asked in parallel; a member that does not answer in
/// [`PEER_STATS_TIMEOUT`] is listed with the error instead.
async fn cluster_stats(State(state): State<ApiState>) -> ApiResult {
    let api = api(&state)?;
    let members = membership::members(&api.raft);
    let asks = members.nodes.iter().map(|(id, addr)| {
        let (id, addr) = (*id, addr.clone());
        let own = (id == api.broker.node_id).then(|| api.broker.node_stats());
        async move {
            let started = std::time::Instant::now();
            let answer = match own {
                Some(stats) => Ok(stats),
                None => network::node_stats(&addr, PEER_STATS_TIMEOUT).await,
            };
            let took_ms = started.elapsed().as_millis() as u64;
            match answer.and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string())) {
                Ok(mut v) => {
                    v["addr"] = addr.into();
                    v["took_ms"] = took_ms.into();
                    v
                }
                Err(e) => json!({ "node_id": id, "addr": addr, "error": e, "took_ms": took_ms }),
            }
        }
    });
    let data = futures::future::join_all(asks).await;
    Ok(Json(json!({ "data": data })).into_response())
}

#[derive(Deserialize)]
struct JoinBody {
    id: NodeId,
    addr: String,
}

async fn cluster_join(State(state): State<ApiState>, Json(body): Json<JoinBody>) -> ApiResult {
    let api = api(&state)?;
    let change = MembershipChange::Join {
        id: body.id,
        addr: body.addr,
    };
    membership_outcome(membership::change(&api.raft, change).await)
}

async fn cluster_leave(State(state): State<ApiState>) -> ApiResult {
    let api = api(&state)?;
    let id = api.broker.node_id;
    membership_outcome(membership::change(&api.raft, MembershipChange::Remove { id }).await)
}

/// How long `POST /cluster/snapshot` waits for the snapshot to be built (within
/// `ctl`'s 130 s).
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Build a snapshot of this node's applied state now, instead of after
/// `cluster.snapshot_after_logs` more entries: before a node joins (it then installs
/// the state as it is, not an older one and the log since), or to shorten the log on
/// disk. Answered once the snapshot covers what was applied when it was asked for.
async fn cluster_snapshot(State(state): State<ApiState>) -> ApiResult {
    let api = api(&state)?;
    let mut metrics = api.raft.metrics();
    let Some(applied) = metrics.borrow().last_applied else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "nothing applied yet: no snapshot to build".into(),
        ));
    };
    api.raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let built = tokio::time::timeout(SNAPSHOT_WAIT, async {
        loop {
            if let Some(at) = metrics
                .borrow()
                .snapshot
                .filter(|s| s.index >= applied.index)
            {
                return Ok(at);
            }
            if metrics.changed().await.is_err() {
                return Err("raft stopped");
            }
        }
    })
    .await;
    match built {
        Ok(Ok(at)) => Ok(Json(json!({ "snapshot_index": at.index })).into_response()),
        Ok(Err(why)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why.into())),
        Err(_) => Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the snapshot of index {} was not built within {SNAPSHOT_WAIT:?}",
                applied.index
            ),
        )),
    }
}

async fn cluster_remove(State(state): State<ApiState>, Path(id): Path<NodeId>) -> ApiResult {
    let api = api(&state)?;
    membership_outcome(membership::change(&api.raft, MembershipChange::Remove { id }).await)
}

fn membership_outcome(outcome: Result<String, String>) -> ApiResult {
    match outcome {
        Ok(message) => Ok(Json(json!({ "message": message })).into_response()),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, e)),
    }
}

fn session_json(client_id: &str, s: &SessionRecord, detail: bool) -> Value {
    let mut v = json!({
        "clientid": client_id,
        "node": s.node,
        "connected": s.connected,
        "proto_ver": s.protocol,
        "expiry_interval": s.expiry_secs,
        "disconnected_at": s.disconnected_at_ms,
        "subscriptions_cnt": s.subscriptions.len(),
        "mqueue_len": s.queue.len(),
        "mqueue_bytes": s.queued_bytes,
        "will": s.will.is_some(),
    });
    if detail {
        v["subscriptions"] = s
            .subscriptions
            .iter()
            .map(|(filter, o)| subscription_json(client_id, filter, o))
            .collect();
    }
    v
}

fn subscription_json(
    client_id: &str,
    filter: &str,
    o: &crate::cluster::command::SubscriptionOptions,
) -> Value {
    json!({
        "clientid": client_id,
        "topic": filter,
        "qos": o.qos,
        "nl": o.no_local,
        "rap": o.retain_as_published,
        "rh": o.retain_handling,
        "subid": o.subscription_id,
    })
}

fn sessions(state: &ApiState, q: &ListQuery, only_connected: bool) -> Result<Vec<Value>, ApiError> {
    let api = api(state)?;
    Ok(api.broker.read_state(|st| {
        st.sessions()
            .filter(|(_, s)| !only_connected || s.connected)
            .filter(|(_, s)| q.connected.is_none_or(|c| s.connected == c))
            .filter(|(_, s)| q.node.is_none_or(|n| s.node == n))
            .filter(|(id, _)| q.like.as_deref().is_none_or(|l| id.contains(l)))
            .filter(|(id, _)| q.clientid.as_deref().is_none_or(|c| &***id == c))
            .map(|(id, s)| session_json(id, s, false))
            .collect()
    }))
}

async fn clients_list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult {
    Ok(paged(sessions(&state, &q, true)?, &q))
}

async fn sessions_list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult {
    Ok(paged(sessions(&state, &q, false)?, &q))
}

async fn client_show(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let api = api(&state)?;
    api.broker
        .read_state(|st| st.session(&id).map(|s| session_json(&id, s, true)))
        .map(|v| Json(v).into_response())
        .ok_or_else(|| not_found(format!("no session for client {id}")))
}

async fn client_kick(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    let api = api(&state)?;
    let result = api
        .broker
        .proposer
        .propose(Command::Kick {
            client_id: Arc::from(id.as_str()),
        })
        .await
        .map_err(unavailable)?;
    match result {
        CommandResult::NoSession => Err(not_found(format!("client {id} is not connected"))),
        _ => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn subscriptions_list(
    State(state): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let api = api(&state)?;
    let items = api.broker.read_state(|st| {
        st.sessions()
            .filter(|(id, _)| q.clientid.as_deref().is_none_or(|c| &***id == c))
            .flat_map(|(id, s)| {
                s.subscriptions
                    .iter()
                    .filter(|(f, _)| q.like.as_deref().is_none_or(|l| f.contains(l)))
                    .map(|(f, o)| subscription_json(id, f, o))
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    Ok(paged(items, &q))
}

/// Shared subscription groups: each `$share/{group}/{filter}` with its members.
async fn shared_list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult {
    let api = api(&state)?;
    let mut groups: std::collections::BTreeMap<(String, String), Vec<Value>> =
        std::collections::BTreeMap::new();
    api.broker.read_state(|st| {
        for (id, s) in st.sessions() {
            for (filter, o) in s.subscriptions.iter() {
                let Some((group, inner)) = crate::mqtt::topic::parse_shared(filter) else {
                    continue;
                };
                if q.like
                    .as_deref()
                    .is_some_and(|l| !group.contains(l) && !inner.contains(l))
                {
                    continue;
                }
                groups
                    .entry((group.to_owned(), inner.to_owned()))
                    .or_default()
                    .push(json!({
                        "clientid": &**id,
                        "node": s.node,
                        "connected": s.connected,
                        "qos": o.qos,
                    }));
            }
        }
    });
    let items = groups
        .into_iter()
        .map(|((group, filter), members)| {
            json!({ "group": group, "topic": filter, "members": members })
        })
        .collect();
    Ok(paged(items, &q))
}

/// A payload as JSON: text when it is UTF-8, base64 otherwise.
fn payload_json(payload: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(payload) {
        Ok(text) => (Value::from(text), "plain"),
        Err(_) => (
            Value::from(base64::engine::general_purpose::STANDARD.encode(payload)),
            "base64",
        ),
    }
}

fn message_json(topic: &str, m: &Message, with_payload: bool) -> Value {
    let mut v = json!({
        "topic": topic,
        "qos": m.qos,
        "payload_size": m.payload.len(),
        "publish_at": m.received_at_ms,
        "from_clientid": m.origin_client.as_deref(),
        "message_expiry_interval": m.properties.message_expiry_interval,
    });
    if with_payload {
        let (payload, encoding) = payload_json(&m.payload);
        v["payload"] = payload;
        v["payload_encoding"] = encoding.into();
    }
    v
}

async fn retained_list(State(state): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult {
    let api = api(&state)?;
    let mut items: Vec<(String, Value)> = api.broker.read_state(|st| {
        st.retained()
            .iter()
            .filter(|(t, _)| q.like.as_deref().is_none_or(|l| t.contains(l)))
            .filter(|(t, _)| q.prefix.as_deref().is_none_or(|p| t.starts_with(p)))
            .map(|(t, m)| {
                let v = message_json(&t, m, false);
                (t, v)
            })
            .collect()
    });
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(paged(items.into_iter().map(|(_, v)| v).collect(), &q))
}

async fn retained_get(State(state): State<ApiState>, Path(topic): Path<String>) -> ApiResult {
    let api = api(&state)?;
    api.broker
        .read_state(|st| {
            st.retained()
                .get(&topic)
                .map(|m| message_json(&topic, m, true))
        })
        .map(|v| Json(v).into_response())
        .ok_or_else(|| not_found(format!("no retained message on {topic}")))
}

async fn retained_delete(State(state): State<ApiState>, Path(topic): Path<String>) -> ApiResult {
    let api = api(&state)?;
    if api
        .broker
        .read_state(|st| st.retained().get(&topic).is_none())
    {
        return Err(not_found(format!("no retained message on {topic}")));
    }
    api.broker
        .proposer
        .propose(Command::SetRetained {
            topic: Arc::from(topic.as_str()),
            message: None,
        })
        .await
        .map_err(unavailable)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of `POST /api/v1/publish`.
#[derive(Debug, Deserialize, Serialize)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    payload: String,
    /// "plain" (default) or "base64".
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    message_expiry_interval: Option<u32>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    user_properties: Vec<(String, String)>,
}

async fn publish(State(state): State<ApiState>, Json(body): Json<PublishBody>) -> ApiResult {
    let api = api(&state)?;
    crate::mqtt::topic::validate_topic_name(&body.topic)
        .map_err(|e| bad_request(format!("invalid topic {:?}: {e}", body.topic)))?;
    if body.qos > 2 {
        return Err(bad_request("qos must be 0, 1 or 2"));
    }
    let payload = match body.payload_encoding.as_deref() {
        None | Some("plain") => bytes::Bytes::from(body.payload.into_bytes()),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.payload.as_bytes())
            .map(bytes::Bytes::from)
            .map_err(|e| bad_request(format!("payload is not base64: {e}")))?,
        Some(other) => return Err(bad_request(format!("unknown payload_encoding {other}"))),
    };
    if payload.len() > api.broker.config.mqtt.max_packet_size as usize {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload larger than mqtt.max_packet_size".into(),
        ));
    }
    let message = Arc::new(Message {
        topic: Arc::from(body.topic.as_str()),
        payload,
        qos: body.qos,
        retain: body.retain,
        properties: MessageProperties {
            message_expiry_interval: body.message_expiry_interval,
            content_type: body.content_type,
            user_properties: body.user_properties,
            ..Default::default()
        },
        received_at_ms: unix_ms(),
        origin_client: None,
    });
    let matched = api
        .broker
        .publish_internal(message)
        .await
        .map_err(unavailable)?;
    Ok(Json(json!({ "matched": matched })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> header::HeaderMap {
        let mut map = header::HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), header::HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn remote() -> SocketAddr {
        "192.0.2.7:50000".parse().unwrap()
    }

    #[test]
    fn without_credentials_configured_only_loopback_gets_in() {
        let access = ApiAccess::default();
        let local: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert!(access.check(&local, &headers(&[])).is_ok());
        assert!(matches!(
            access.check(&remote(), &headers(&[])),
            Err(Refusal::NotLoopback)
        ));
    }

    #[test]
    fn the_token_admits_as_a_bearer_header_or_as_the_dashboards_cookie() {
        let access = ApiAccess::load(Some("s3cret; token=x"), None).unwrap();
        let bearer = headers(&[(header::AUTHORIZATION, "Bearer s3cret; token=x")]);
        assert!(access.check(&remote(), &bearer).is_ok());
        // What the sign-in page sets is what the guard reads back.
        let set = token_cookie_value("s3cret; token=x");
        let pair = set.split(';').next().unwrap();
        let cookie = headers(&[(header::COOKIE, &format!("theme=dark; {pair}"))]);
        assert!(access.check(&remote(), &cookie).is_ok());
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let wrong = token_cookie_value("guess");
        let wrong = headers(&[(header::COOKIE, wrong.split(';').next().unwrap())]);
        assert!(matches!(
            access.check(&remote(), &wrong),
            Err(Refusal::Unauthenticated)
        ));
        assert!(matches!(
            access.check(&remote(), &headers(&[])),
            Err(Refusal::Unauthenticated)
        ));
        assert!(access.admits_token("s3cret; token=x"));
        assert!(!access.admits_token("s3cret"));
    }
}
