//! The web dashboard, served under `/` by every node: hand-written HTML, CSS and
//! JavaScript compiled into the binary (`dashboard/`), so the build needs nothing
//! beyond cargo and the page nothing beyond this server. Its data comes from the
//! admin API under `/api/v1`; its topic tester talks MQTT over the node's WebSocket
//! listener from the browser.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | the single page (hash routes: `#/cluster`, `#/clients`, `#/clients/{id}`, `#/subscriptions`, `#/retained`, `#/tester`, `#/charts`) |
//! | `GET /dashboard/app.js`, `GET /dashboard/mqtt.js` | its scripts |
//! | `GET /dashboard/style.css` | its stylesheet (public: the sign-in page uses it; it holds no data) |
//! | `POST /login` | a form with the bearer token: sets the cookie the API also accepts |
//! | `POST /logout` | clears that cookie |
//!
//! Access is the admin API's ([`ApiAccess`]): loopback only when no credential is
//! configured; otherwise basic auth (the browser asks) or the bearer token, which a
//! browser cannot send by itself and so gives once on the sign-in page, answered
//! with an `HttpOnly`, `SameSite=Strict` cookie. A refused page gets the sign-in
//! page (401). This module never reads the broker's state: the page does, through
//! the API.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::api::{self, ApiAccess, Refusal};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const LOGIN_HTML: &str = include_str!("dashboard/login.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const MQTT_JS: &str = include_str!("dashboard/mqtt.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Scripts and styles from this server only, no inline script, no framing; the
/// topic tester may open WebSockets to the node's MQTT listener (another port).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
     frame-ancestors 'none'; form-action 'self'";

/// The dashboard's routes.
pub fn router(access: ApiAccess) -> Router {
    let guarded = Router::new()
        .route("/", get(|| async { asset(HTML, INDEX_HTML) }))
        .route("/dashboard/app.js", get(|| async { asset(JS, APP_JS) }))
        .route("/dashboard/mqtt.js", get(|| async { asset(JS, MQTT_JS) }))
        .layer(middleware::from_fn_with_state(access.clone(), guard));
    Router::new()
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/login", post(login))
        .route("/logout", post(logout))
        .with_state(access)
        .merge(guarded)
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// A static asset with its type and the headers every dashboard answer carries.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(headers);
    response
}

fn secure(headers: &mut header::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The sign-in page, with `notice` said above the form.
fn sign_in(access: &ApiAccess, status: StatusCode, notice: &str) -> Response {
    let how = match (access.has_users(), access.token_configured()) {
        (true, true) => "Sign in with a user of the admin API's password file (your browser asks), or give the API token below.",
        (true, false) => "Sign in with a user of the admin API's password file: reload the page and your browser asks.",
        _ => "Give the admin API's token (api_token).",
    };
    let page = LOGIN_HTML
        .replace("{{notice}}", notice)
        .replace("{{how}}", how)
        .replace(
            "{{form_hidden}}",
            if access.token_configured() {
                ""
            } else {
                " hidden"
            },
        );
    let mut response = (status, page).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(HTML));
    secure(headers);
    if access.has_users() && status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, api::BASIC_CHALLENGE);
    }
    response
}

async fn guard(
    State(access): State<ApiAccess>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    match access.check(&peer, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(Refusal::Unauthenticated) => sign_in(&access, StatusCode::UNAUTHORIZED, ""),
        Err(Refusal::NotLoopback) => (StatusCode::FORBIDDEN, api::NOT_LOOPBACK).into_response(),
    }
}

/// The sign-in form.
#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(access): State<ApiAccess>, Form(form): Form<LoginForm>) -> Response {
    if !access.admits_token(&form.token) {
        return sign_in(
            &access,
            StatusCode::UNAUTHORIZED,
            "That token is not the API's token.",
        );
    }
    let mut response = Redirect::to("/").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&api::token_cookie_value(&form.token)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn logout() -> Response {
    let mut response = Redirect::to("/").into_response();
    // The same cookie, empty and already expired.
    let expired = format!("{}; Max-Age=0", api::token_cookie_value(""));
    if let Ok(expired) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, expired);
    }
    response
}
