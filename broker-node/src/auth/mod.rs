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
    /// Bumped by every [`Auth::replace`], so that what a connection derived from the
    /// ACL (whether its messages need a check at delivery) is derived again.
    generation: std::sync::atomic::AtomicU32,
    /// Recent failures by address, to slow down password guessing.
    pub failures: Failures,
}

impl Auth {
    /// Auth with `rules` in force.
    pub fn new(rules: Rules) -> Auth {
        Auth {
            rules: RwLock::new(Arc::new(rules)),
            generation: Default::default(),
            failures: Failures::default(),
        }
    }

    /// Replace the rules (SIGHUP).
    pub fn replace(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Whether an ACL file is in force.
    pub fn has_acl(&self) -> bool {
        self.rules().acl.is_some()
    }

    /// Which rules are in force: changes with every reload.
    pub fn generation(&self) -> u32 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Decide whether `connect`, received on `listener`, may open a session: the
    /// username it was verified as (`None`: anonymous, whatever name it gave, so an
    /// unverified name never selects another user's ACL rules), or the CONNACK reason.
    pub fn authenticate(
        &self,
        connect: &Connect,
        listener: &str,
    ) -> Result<Option<Arc<str>>, ReasonCode> {
        let rules = self.rules();
        let anonymous = rules.anonymous_on.contains(&listener);
        match (&connect.username, &rules.passwords) {
            (None, _) if anonymous => Ok(None),
            (None, _) => {
                tracing::info!(client_id = %connect.client_id, "connection refused: no username and anonymous access is off");
                Err(ReasonCode::NotAuthorized)
            }
            (Some(user), Some(file)) => {
                let password = connect.password.as_deref().unwrap_or_default();
                if file.verify(user, password) {
                    Ok(Some(Arc::from(user.as_str())))
                } else {
                    tracing::info!(client_id = %connect.client_id, username = %user, "connection refused: bad username or password");
                    Err(ReasonCode::BadUserNameOrPassword)
                }
            }
            // A username but no password file: nothing to check it against, so it is
            // an anonymous client that happens to name itself, and is treated as one.
            (Some(user), None) if anonymous => {
                tracing::debug!(client_id = %connect.client_id, username = %user, "unverified username ignored: the client is anonymous");
                Ok(None)
            }
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

    /// Whether the client may subscribe to `filter` (shared prefix removed), and
    /// whether the messages it matches must be checked at delivery.
    pub fn subscribe_access(
        &self,
        username: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> acl::SubscribeAccess {
        match &self.rules().acl {
            Some(acl) => acl.subscribe_access(username, client_id, filter),
            None => acl::SubscribeAccess::Granted,
        }
    }

    /// Whether the client may receive a message published to `topic`.
    pub fn may_read(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        match &self.rules().acl {
            Some(acl) => acl.may_read(username, client_id, topic),
            None => true,
        }
    }
}

/// Repeated authentication failures from one address slow every later attempt from it:
/// the first failure costs nothing (a typo), then each attempt waits 250 ms, doubling
/// with every failure up to [`MAX_FAILURE_DELAY`], *before* its credentials are checked,
/// and at most [`MAX_ATTEMPTS_WHILE_SLOWED`] attempts of a slowed address run at once
/// (others are refused unchecked), so neither parallel connections nor a success with
/// an account of one's own buys faster guessing. [`FAILURE_MEMORY`] without a failure
/// clears an address. IPv6 addresses count per /64, the block one host usually holds.
#[derive(Debug, Default)]
pub struct Failures {
    by_addr: Mutex<HashMap<IpAddr, Record>>,
}

/// What is remembered of one address.
#[derive(Debug)]
struct Record {
    /// Failures in a row (reset by a quiet [`FAILURE_MEMORY`]).
    failures: u32,
    /// When the last one happened.
    last: Instant,
    /// Attempts from the address being checked right now.
    in_progress: u32,
}

/// The longest wait before an attempt from a failing address is checked.
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(5);
/// How long an address's failures are remembered after its last one.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond, the one with the fewest failures is dropped.
const MAX_ADDRESSES: usize = 10_000;
/// Concurrent attempts allowed from an address that is being slowed down.
pub const MAX_ATTEMPTS_WHILE_SLOWED: u32 = 4;

/// An authentication attempt under way from one address; [`Failures::begin`] gives it.
#[derive(Debug)]
pub struct Attempt<'a> {
    failures: &'a Failures,
    key: IpAddr,
    /// How long to wait before checking the credentials.
    pub wait: Duration,
    settled: bool,
}

impl Failures {
    fn key(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(
                    u128::from(v6) & !((1u128 << 64) - 1),
                )),
            },
            v4 => v4,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.by_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start an attempt from `addr` at `now`: how long it must wait before its
    /// credentials are checked, or `None` when the address already has as many
    /// attempts under way as a slowed address may (refuse it unchecked).
    pub fn begin(&self, addr: IpAddr, now: Instant) -> Option<Attempt<'_>> {
        let key = Self::key(addr);
        let mut map = self.lock();
        let wait = match map.get_mut(&key) {
            None => Duration::ZERO,
            Some(r) => {
                if now.duration_since(r.last) >= FAILURE_MEMORY {
                    r.failures = 0;
                }
                let wait = failure_delay(r.failures.saturating_add(1));
                if !wait.is_zero() && r.in_progress >= MAX_ATTEMPTS_WHILE_SLOWED {
                    return None;
                }
                r.in_progress += 1;
                wait
            }
        };
        Some(Attempt {
            failures: self,
            key,
            wait,
            settled: false,
        })
    }
}

impl Attempt<'_> {
    /// The credentials were wrong: the address's next attempts wait longer.
    pub fn failed(mut self, now: Instant) {
        self.settled = true;
        let mut map = self.failures.lock();
        if !map.contains_key(&self.key) && map.len() >= MAX_ADDRESSES {
            map.retain(|_, r| now.duration_since(r.last) < FAILURE_MEMORY || r.in_progress > 0);
            if map.len() >= MAX_ADDRESSES {
                let fewest = map
                    .iter()
                    .filter(|(_, r)| r.in_progress == 0)
                    .min_by_key(|(_, r)| (r.failures, r.last))
                    .map(|(k, _)| *k);
                if let Some(k) = fewest {
                    map.remove(&k);
                }
            }
        }
        let r = map.entry(self.key).or_insert(Record {
            failures: 0,
            last: now,
            in_progress: 1,
        });
        if now.duration_since(r.last) >= FAILURE_MEMORY {
            r.failures = 0;
        }
        r.failures = r.failures.saturating_add(1);
        r.last = now;
        r.in_progress = r.in_progress.saturating_sub(1);
    }
}

impl Drop for Attempt<'_> {
    /// Succeeded or abandoned: only the count of attempts under way changes (a
    /// success does not clear the failures, or one's own account would reset them).
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(r) = self.failures.lock().get_mut(&self.key) {
            r.in_progress = r.in_progress.saturating_sub(1);
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

    fn fail(f: &Failures, addr: IpAddr, now: Instant) -> Duration {
        let attempt = f.begin(addr, now).expect("admitted");
        let wait = attempt.wait;
        attempt.failed(now);
        wait
    }

    #[test]
    fn every_attempt_after_repeated_failures_waits_longer_and_a_success_clears_nothing() {
        let f = Failures::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        let waits: Vec<u128> = (0..8).map(|_| fail(&f, a, t0).as_millis()).collect();
        assert_eq!(waits, [0, 250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(fail(&f, b, t0), Duration::ZERO, "per address");
        // A success (an attempt that is dropped) leaves the count as it was.
        drop(f.begin(a, t0).expect("admitted"));
        assert_eq!(f.begin(a, t0).expect("admitted").wait, MAX_FAILURE_DELAY);
        assert_eq!(
            fail(&f, a, t0 + FAILURE_MEMORY),
            Duration::ZERO,
            "forgotten after a quiet minute"
        );
    }

    #[test]
    fn a_slowed_address_gets_only_a_few_attempts_at_once_and_ipv6_counts_per_64() {
        let f = Failures::default();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let t0 = Instant::now();
        fail(&f, a, t0);
        assert_eq!(fail(&f, same_64, t0), Duration::from_millis(250));
        let held: Vec<_> = (0..MAX_ATTEMPTS_WHILE_SLOWED)
            .map(|_| f.begin(a, t0).expect("admitted"))
            .collect();
        assert!(f.begin(same_64, t0).is_none(), "refused unchecked");
        drop(held);
        assert!(f.begin(a, t0).is_some());
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(f.begin(other, t0).expect("admitted").wait, Duration::ZERO);
    }
}
