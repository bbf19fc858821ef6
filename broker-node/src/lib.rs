//! FlockMQ's broker node: a clustered MQTT 3.1.1 / 5.0 broker. See ARCHITECTURE.md for
//! the map of modules.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
