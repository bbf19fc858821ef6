//! The inter-node gRPC protocol of FlockMQ (package `flockmq.cluster.v1`): the
//! `.proto` files and the tonic/prost code generated from them, nothing else.
//! Conversions between these types and the broker's own live in `broker-node`'s
//! `cluster` module; generated types must not travel further than that.

#![allow(missing_docs)]

/// Version 1 of the cluster protocol.
pub mod v1 {
    tonic::include_proto!("flockmq.cluster.v1");
}
