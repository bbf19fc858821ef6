//! FlockMQ's broker node: a clustered MQTT 3.1.1 / 5.0 broker. See ARCHITECTURE.md for
//! the map of modules.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod auth;
pub mod bridge;
pub mod broker;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod hash;
pub mod http;
pub mod logging;
pub mod mosquitto_conf;
pub mod mqtt;
pub mod net;
pub mod node;
pub mod router;
pub mod session;
pub mod telemetry;
pub mod transport;
