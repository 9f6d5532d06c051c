//! ipamd: ferry's per-node IPAM daemon.

pub mod alloc;
pub mod cluster;
pub mod error;
pub mod ipam;
pub mod model;
pub mod store;
