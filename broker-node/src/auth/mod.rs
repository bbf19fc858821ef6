//! Authentication and authorization of clients.
//!
//! Credentials come from a Mosquitto-compatible password file (`mqtt.password_file`,
//! see [`password`]); permissions from a Mosquitto-compatible ACL file
//! (`mqtt.acl_file`, see [`acl`]). `mqtt.allow_anonymous` decides whether clients
//! without a username get in. Both files are read at start and again on SIGHUP; a
//! file that does not parse at reload leaves the previous one in force. Nothing here
//! does I/O on a connection.

pub mod acl;
pub mod password;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::{Config, LISTENERS};
use crate::mqtt::{Connect, ReasonCode};

use self::acl::Acl;
use self::password::PasswordFile;

/// The rules in force.
#[derive(Debug, Default)]
pub struct Rules {
    /// The listeners ("tcp", "tls", "ws", "wss") that admit clients without credentials.
    anonymous_on: Vec<&'static str>,
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
}

/// Why the authentication files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file.
    #[error(transparent)]
    Password(#[from] password::PasswordFileError),
    /// The ACL file.
    #[error(transparent)]
    Acl(#[from] acl::AclError),
}

impl Rules {
    /// Load the files `config` names.
    pub fn load(config: &Config) -> Result<Rules, AuthError> {
        let anonymous_on = LISTENERS
            .into_iter()
            .filter(|l| config.anonymous_allowed_on(l))
            .collect();
        let config = &config.mqtt;
        Ok(Rules {
            anonymous_on,
            passwords: match &config.password_file {
                Some(path) => Some(PasswordFile::load(path.as_ref())?),
                None => None,
            },
            acl: match &config.acl_file {
                Some(path) => Some(Acl::load(path.as_ref())?),
                None => None,
            },
        })
    }
}

/// The node's authentication and authorization, reloadable.
#[derive(Debug, Default)]
pub struct Auth {
    rules: RwLock<Arc<Rules>>,
    /// Recent failures by address, to slow down password guessing.
    pub failures: Failures,
}

impl Auth {
    /// Auth with `rules` in force.
    pub fn new(rules: Rules) -> Auth {
        Auth {
            rules: RwLock::new(Arc::new(rules)),
            failures: Failures::default(),
        }
    }

    /// Replace the rules (SIGHUP).
    pub fn replace(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Decide whether `connect`, received on `listener`, may open a session; the
    /// error is the CONNACK reason.
    pub fn authenticate(&self, connect: &Connect, listener: &str) -> Result<(), ReasonCode> {
        let rules = self.rules();
        let anonymous = rules.anonymous_on.contains(&listener);
        match (&connect.username, &rules.passwords) {
            (None, _) if anonymous => Ok(()),
            (None, _) => {
                tracing::info!(client_id = %connect.client_id, "connection refused: no username and anonymous access is off");
                Err(ReasonCode::NotAuthorized)
            }
            (Some(user), Some(file)) => {
                let password = connect.password.as_deref().unwrap_or_default();
                if file.verify(user, password) {
                    Ok(())
                } else {
                    tracing::info!(client_id = %connect.client_id, username = %user, "connection refused: bad username or password");
                    Err(ReasonCode::BadUserNameOrPassword)
                }
            }
            // A username but no password file: nothing to check it against, so it is
            // an anonymous client that happens to name itself.
            (Some(_), None) if anonymous => Ok(()),
            (Some(user), None) => {
                tracing::info!(client_id = %connect.client_id, username = %user, "connection refused: anonymous access is off and no password file is configured");
                Err(ReasonCode::NotAuthorized)
            }
        }
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        match &self.rules().acl {
            Some(acl) => acl.may_publish(username, client_id, topic),
            None => true,
        }
    }

    /// Whether the client may subscribe to `filter` (shared prefix removed).
    pub fn may_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        match &self.rules().acl {
            Some(acl) => acl.may_subscribe(username, client_id, filter),
            None => true,
        }
    }
}

/// Repeated authentication failures from one address are answered ever more slowly:
/// the first at once (a typo), then after 250 ms, doubling up to [`MAX_FAILURE_DELAY`].
/// A success from the address, or [`FAILURE_MEMORY`] without a failure, clears it.
#[derive(Debug, Default)]
pub struct Failures {
    by_addr: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// The longest wait before a refusal is answered.
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(5);
/// How long an address's failures are remembered after its last one.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond, the forgotten ones are dropped first.
const MAX_ADDRESSES: usize = 10_000;

impl Failures {
    /// Record a failure from `addr` at `now`; returns how long to wait before
    /// answering it.
    pub fn failed(&self, addr: IpAddr, now: Instant) -> Duration {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ADDRESSES {
            map.retain(|_, (_, last)| now.duration_since(*last) < FAILURE_MEMORY);
            if map.len() >= MAX_ADDRESSES {
                map.clear();
            }
        }
        let entry = map.entry(addr).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        failure_delay(entry.0)
    }

    /// A client from `addr` authenticated: its address starts afresh.
    pub fn succeeded(&self, addr: IpAddr) {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if !map.is_empty() {
            map.remove(&addr);
        }
    }
}

/// The wait before answering the `n`th failure in a row.
fn failure_delay(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(250)
            .saturating_mul(1 << (n - 2).min(8))
            .min(MAX_FAILURE_DELAY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_from_one_address_wait_longer_and_a_success_clears_them() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        let waits: Vec<u128> = (0..8).map(|_| f.failed(a, t0).as_millis()).collect();
        assert_eq!(waits, [0, 250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(f.failed(b, t0), Duration::ZERO, "per address");
        f.succeeded(a);
        assert_eq!(f.failed(a, t0), Duration::ZERO);
        assert_eq!(
            f.failed(a, t0 + FAILURE_MEMORY),
            Duration::ZERO,
            "forgotten after a quiet minute"
        );
    }
}
