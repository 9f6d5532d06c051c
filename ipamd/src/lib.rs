//! ipamd: ferry's per-node IPAM daemon.
//!
//! - `daemon`: wiring. [`daemon::run`] serves until told to stop; `main.rs`
//!   only parses flags and turns signals into that stop.
//! - `grpc`: the tonic services; request checks and conversions at the edge.
//! - `ipam`: the core. The pure allocator (`alloc`) behind a lock, made
//!   durable through a [`store::Store`], blocks claimed through a
//!   [`cluster::ClusterStore`]; it publishes the blocks it owns.
//! - `alloc`: pure allocation logic: pools, blocks, planning. No I/O, time
//!   passed in, property-tested.
//! - `store`: the `Store` trait, sled and in-memory implementations, and
//!   the rebuild of a damaged database.
//! - `cluster`: who owns which block; `local` for a single node.
//! - `reconcile`: allocations against host veths and pod netns.
//! - `node`: the node's dataplane: forwarding, block routes, MTU, veths.
//! - `metrics`: counters, gRPC timing, the Prometheus endpoint.
//! - `config`: flags and `ipamd.toml` into one checked [`config::Config`].
//! - `model`, `error`, `clock`: the shared vocabulary.

pub mod alloc;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod error;
pub mod grpc;
pub mod ipam;
pub mod metrics;
pub mod model;
pub mod node;
pub mod reconcile;
pub mod store;
