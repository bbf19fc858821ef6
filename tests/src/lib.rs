//! Helpers shared by FlockMQ's integration tests: starting real `broker-node`
//! processes on loopback ports and waiting for them to be ready.
