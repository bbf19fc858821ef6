//! Logging set-up: `tracing` filtered by `RUST_LOG` (else the configured level, else
//! `info`), human-readable lines by default and JSON lines on request. The filter can
//! be replaced while the node runs ([`set_filter`]: the admin API's
//! `PUT /api/v1/log/level`, `broker-node ctl log level debug`), without a restart.
//!
//! State: the reload handle of the installed subscriber, set once by [`init`].

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// The filter used when neither `RUST_LOG` nor `log.level` says otherwise.
const DEFAULT_FILTER: &str = "info,openraft=warn";

/// The installed filter's reload handle and the text it was made from.
struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    filter: Mutex<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Install the global subscriber; later calls (tests) are ignored.
pub fn init(config: &LogConfig) {
    let text = std::env::var("RUST_LOG")
        .ok()
        .filter(|t| EnvFilter::try_new(t).is_ok())
        .or_else(|| config.level.clone())
        .filter(|t| EnvFilter::try_new(t).is_ok())
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = config.format == LogFormat::Json;
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(fmt::layer))
        .with(json.then(|| fmt::layer().json()))
        .try_init()
        .is_ok();
    if installed {
        let _ = INSTALLED.set(Installed {
            handle,
            filter: Mutex::new(text),
        });
    }
}

/// Why a filter was not put in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// Not a tracing filter (`debug`, `info,broker_node=trace`, ...).
    #[error("'{0}' is not a log filter: {1}")]
    Invalid(String, String),
    /// No subscriber of ours is installed (a library under test).
    #[error("logging was not set up by this process")]
    NotInstalled,
}

/// Put the filter `text` in force for every later event (e.g. "debug" or
/// "info,broker_node::cluster=debug"); returns it.
pub fn set_filter(text: &str) -> Result<String, LogError> {
    let text = text.trim();
    let filter =
        EnvFilter::try_new(text).map_err(|e| LogError::Invalid(text.to_owned(), e.to_string()))?;
    let installed = INSTALLED.get().ok_or(LogError::NotInstalled)?;
    installed
        .handle
        .reload(filter)
        .map_err(|_| LogError::NotInstalled)?;
    if let Ok(mut current) = installed.filter.lock() {
        *current = text.to_owned();
    }
    tracing::info!(filter = text, "log filter changed");
    Ok(text.to_owned())
}

/// The filter in force, as it was written.
pub fn filter() -> Result<String, LogError> {
    let installed = INSTALLED.get().ok_or(LogError::NotInstalled)?;
    Ok(installed
        .filter
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default())
}
