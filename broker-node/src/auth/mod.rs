//! Authentication and authorization of clients.
//!
//! Today this is the anonymous-access rule from configuration: with
//! `mqtt.allow_anonymous = true` every client is admitted (credentials are not
//! checked, as in Mosquitto without a password file); with it off, every client is
//! refused as not authorized, since no credential store is configured yet. Password
//! files, client certificates and ACLs plug in here. It never does I/O on the
//! connection itself.

use crate::config::Config;
use crate::mqtt::{Connect, ReasonCode};

/// Decide whether `connect` may open a session; the error is the CONNACK reason code.
pub fn authenticate(config: &Config, connect: &Connect) -> Result<(), ReasonCode> {
    if config.mqtt.allow_anonymous {
        return Ok(());
    }
    tracing::info!(
        client_id = %connect.client_id,
        has_username = connect.username.is_some(),
        "connection refused: anonymous access is off and no credential store is configured"
    );
    Err(ReasonCode::NotAuthorized)
}
