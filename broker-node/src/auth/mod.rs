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

use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::mqtt::{Connect, ReasonCode};

use self::acl::Acl;
use self::password::PasswordFile;

/// The rules in force.
#[derive(Debug, Default)]
pub struct Rules {
    allow_anonymous: bool,
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
        let allow_anonymous = config.anonymous_allowed();
        let config = &config.mqtt;
        Ok(Rules {
            allow_anonymous,
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
}

impl Auth {
    /// Auth with `rules` in force.
    pub fn new(rules: Rules) -> Auth {
        Auth {
            rules: RwLock::new(Arc::new(rules)),
        }
    }

    /// Replace the rules (SIGHUP).
    pub fn replace(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Decide whether `connect` may open a session; the error is the CONNACK reason.
    pub fn authenticate(&self, connect: &Connect) -> Result<(), ReasonCode> {
        let rules = self.rules();
        match (&connect.username, &rules.passwords) {
            (None, _) if rules.allow_anonymous => Ok(()),
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
            (Some(_), None) if rules.allow_anonymous => Ok(()),
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
