//! ipamd: ferry's per-node IPAM daemon.

pub mod alloc;
pub mod cluster;
pub mod config;
pub mod error;
pub mod grpc;
pub mod ipam;
pub mod metrics;
pub mod model;
pub mod node;
pub mod reconcile;
pub mod store;
