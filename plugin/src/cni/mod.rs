//! CNI protocol: env + stdin -> typed [`Request`]; results and errors per spec version.
//!
//! What comes from where:
//! - From the `cni-plugin` crate (0.2.1): only `reply::Route` (`{dst, gw}`) and
//!   `reply::Dns` (`{}` when empty) for the entries ferry itself adds to a
//!   result. Both serialize exactly as every spec version from 0.3.0 to 1.1.0
//!   expects.
//! - Ours, in this module, because the crate gets them wrong or lacks them:
//!   - spec versions (`version.rs`): the crate knows 0.4.0 and 1.0.0 only,
//!     and its VERSION reply claims any 1.x the runtime asks for;
//!   - the request (`request.rs`): env validation, verbs STATUS and GC, the
//!     per-verb version gates (CHECK >= 0.4.0, STATUS/GC >= 1.1.0);
//!   - CNI_ARGS (`args.rs`): the crate ignores it;
//!   - CNI_NETNS (`netns.rs`): never the node's own network namespace;
//!   - the network config (`config.rs`): the crate's `NetworkConfig` fails
//!     the whole config on things ferry never reads (an `sctp` port mapping,
//!     an `ipMasq` that is not a bool);
//!   - the result (`result.rs`): the crate's `Ip` has no `version` field, so
//!     it cannot write 0.3.x/0.4.0 results; its `Interface` requires a
//!     `sandbox` (so a host interface gets `"sandbox":""`) and prints MACs in
//!     upper case; a chained `prevResult` is kept as raw JSON so fields the
//!     crate does not know (1.1.0 route `table`, interface `mtu`...) survive;
//!   - errors (`error.rs`): ferry's codes (README.md, "Error codes"), not
//!     the crate's.

pub mod args;
pub mod config;
pub mod error;
pub mod netns;
pub mod request;
pub mod result;
pub mod version;

#[cfg(test)]
mod fuzz_tests;

pub use error::CniError;
pub use request::{Attachment, GcRequest, Request, StatusRequest};
pub use version::CniVersion;
