//! Starting and stopping a node: storage, Raft, the gRPC server, the broker runtime
//! and the listeners, wired together under one shutdown tree.
//!
//! [`run`] takes its configuration and the shutdown signal as arguments (main only
//! wires). Shutdown is bounded: listeners stop, v5 clients get DISCONNECT 0x8B,
//! connection tasks finish, Raft stops and storage is flushed, all within
//! [`SHUTDOWN_GRACE`], which logs when it runs out.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Connections};
use crate::cluster::forward::{ForwardSink, Forwarder};
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::{auth, http, telemetry, transport};

/// How long shutdown may take before the node gives up waiting.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Run a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // One TLS configuration per TLS listener: client certificates may be required on
    // one and optional on the other.
    let tls_slot = |addr: Option<std::net::SocketAddr>, listener| match addr {
        Some(_) => transport::tls::TlsSlot::load(&config, listener)
            .map(|slot| Some(Arc::new(slot)))
            .context("cannot set up TLS"),
        None => Ok(None),
    };
    let tls = tls_slot(config.tls_addr, "tls")?;
    let wss = tls_slot(config.wss_addr, "wss")?;
    let https = tls_slot(config.http_tls.then_some(config.http_addr), "https")?;
    let auth_rules = auth::Rules::load(&config).context("cannot load authentication files")?;
    let api_access = http::api::ApiAccess::load(
        config.api_token.as_deref(),
        config.api_password_file.as_deref(),
    )
    .context("cannot load the admin API's password file")?;
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;

    let root = CancellationToken::new();
    let tracker = TaskTracker::new();

    let metrics = telemetry::metrics_handle();
    metrics::gauge!("flockmq_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let readiness = http::Readiness::default();
    let http_listener = http::bind(config.http_addr).await?;
    tracing::info!(addr = %http_listener.local_addr()?, "HTTP listener ready");
    let api = http::api::ApiSlot::default();
    tracker.spawn(http::serve(
        http_listener,
        https.clone(),
        metrics,
        readiness.clone(),
        api.clone(),
        api_access.clone(),
        root.child_token(),
    ));

    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let cluster = Cluster::start(&config, events_tx, root.child_token())
        .await
        .context("cannot start the cluster layer")?;
    let Cluster {
        raft,
        state,
        proposer,
        storage,
        forward_sink,
        contacts,
        stats,
        tls: cluster_tls,
    } = cluster;
    readiness.storage_open.store(true, Ordering::Release);
    let _ = readiness.state.set(state.clone());

    let forwarder = Forwarder::new(
        config.node_id,
        config.cluster.forward_buffer_messages,
        state.raft_metrics(),
        root.child_token(),
    );
    let (lot, parking) =
        crate::broker::park::Lot::new().context("cannot create the parking lot")?;
    let first_connection_id = crate::broker::first_connection_id(&storage)
        .await
        .context("cannot reserve this run's connection ids")?;
    let broker = Broker::new(
        config.clone(),
        first_connection_id,
        state,
        proposer,
        forwarder,
        auth::Auth::new(auth_rules),
        root.child_token(),
        lot.clone(),
    );
    tracker.spawn(parking.run(lot, broker.clone(), tracker.clone()));
    let tls_slots = tls
        .iter()
        .chain(wss.iter())
        .chain(https.iter())
        .cloned()
        .collect();
    tracker.spawn(reload_on_sighup(
        broker.clone(),
        tls_slots,
        cluster_tls,
        api_access,
    ));
    let sink: Arc<dyn ForwardSink> = broker.clone();
    let _ = forward_sink.set(sink);
    let source: Arc<dyn cluster::stats::StatsSource> = broker.clone();
    let _ = stats.set(source);
    tracker.spawn(broker.clone().run_rates());
    // Bridges run on the leader; their local sessions are clients of this broker.
    let bridges = crate::bridge::Bridges::new(&config.bridges);
    tracker.spawn(bridges.clone().run(broker.clone(), root.child_token()));
    let _ = api.set(http::api::Api {
        broker: broker.clone(),
        raft: raft.clone(),
        bridges,
    });
    tracker.spawn(broker.clone().run_events(events_rx));
    tracker.spawn(broker.clone().run_expiry(Duration::from_secs(1)));
    tracker.spawn(broker.clone().run_node_watch(
        raft.clone(),
        contacts,
        config.cluster.node_lost_after,
        config.cluster.autoclean_after,
    ));
    tracker.spawn(
        broker
            .clone()
            .run_state_gauges(raft.clone(), Duration::from_secs(1)),
    );
    tracker.spawn(broker.clone().run_leader_watch(raft.clone()));
    if !config.mqtt.sys_interval.is_zero() {
        tracker.spawn(broker.clone().run_sys(config.mqtt.sys_interval));
    }
    tracker.spawn(broker.clone().close_orphaned_sessions());

    let mqtt = crate::net::bind(config.mqtt_addr).await?;
    tracing::info!(addr = %mqtt.local_addr()?, node_id = config.node_id, "MQTT listener ready");
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The listeners hand every stream they accept to the broker's connection tasks.
    let handler = Connections(broker.clone());
    let limits = transport::Limits::new(&config);
    tracker.spawn(transport::serve(
        mqtt,
        transport::Security::Plain,
        handler.clone(),
        limits,
        broker.shutdown.clone(),
        tracker.clone(),
        open.clone(),
    ));
    let listeners = [
        (
            config.tls_addr,
            "MQTT/TLS",
            tls.map(transport::Security::Tls),
        ),
        (
            config.ws_addr,
            "MQTT/WebSocket",
            Some(transport::Security::Ws),
        ),
        (
            config.wss_addr,
            "MQTT/secure WebSocket",
            wss.map(transport::Security::Wss),
        ),
    ];
    for (addr, name, security) in listeners {
        let (Some(addr), Some(security)) = (addr, security) else {
            continue;
        };
        let listener = crate::net::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "{name} listener ready");
        tracker.spawn(transport::serve(
            listener,
            security,
            handler.clone(),
            limits,
            broker.shutdown.clone(),
            tracker.clone(),
            open.clone(),
        ));
    }
    readiness.listeners_bound.store(true, Ordering::Release);

    shutdown.await;
    tracing::info!("shutting down");
    root.cancel();
    tracker.close();
    let graceful = async {
        tracker.wait().await;
        tracing::debug!("every task has stopped; stopping raft");
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        cluster::close_storage(storage).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful)
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period ran out");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reload the password and ACL files on SIGHUP, as Mosquitto does, and the TLS
/// certificate, key and CA files of the listeners and of the cluster (new handshakes
/// use them; established connections stay up). A file that does not load leaves what
/// is in force unchanged.
async fn reload_on_sighup(
    broker: Arc<Broker>,
    tls: Vec<Arc<transport::tls::TlsSlot>>,
    cluster_tls: Option<Arc<cluster::tls::ClusterTls>>,
    api_access: http::api::ApiAccess,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; authentication files will not reload");
            return;
        };
        loop {
            tokio::select! {
                biased;
                _ = broker.shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match auth::Rules::load(&broker.config) {
                Ok(rules) => {
                    broker.auth.replace(rules);
                    tracing::info!("SIGHUP: password and ACL files reloaded");
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed, previous rules stay"),
            }
            if let Some(path) = broker.config.api_password_file.as_deref() {
                match api_access.reload_users(path) {
                    Ok(()) => tracing::info!("SIGHUP: admin API password file reloaded"),
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: admin API password file reload failed, its users stay"
                    ),
                }
            }
            for tls in &tls {
                match tls.reload(&broker.config) {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate, key and CA files reloaded"),
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: TLS reload failed, the previous certificates stay"
                    ),
                }
            }
            if let Some(cluster_tls) = &cluster_tls {
                match cluster_tls.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: cluster TLS certificate, key and CA files reloaded")
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: cluster TLS reload failed, the previous certificates stay"
                    ),
                }
            }
        }
    }
    #[cfg(not(unix))]
    broker.shutdown.cancelled().await;
}
