//! Everything FlockMQ keeps on disk: the sled-backed openraft log store and the
//! state machine's snapshots. It knows neither MQTT nor gRPC, and no sled type
//! appears in its public API.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
