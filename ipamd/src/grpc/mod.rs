//! The gRPC face of ipamd: `ferry.ipam.v1.Ipam` for the plugin
//! (`ipam_service.rs`) and `IpamAdmin` for ipamctl (`admin_service.rs`),
//! over the core [`crate::ipam::Ipam`]. This module owns the wire: version
//! checks, request validation and model <-> proto conversion
//! (`convert.rs`), and the one mapping from [`IpamError`] to a gRPC status.

use tonic::{Code, Status};

use crate::error::IpamError;
use crate::reconcile::ReconcileError;

mod admin_service;
mod convert;
mod ipam_service;

pub use admin_service::AdminService;
pub use convert::{allocation_to_pb, pool_to_pb};
pub use ipam_service::IpamService;

/// The one place an [`IpamError`] becomes a gRPC status. The plugin picks
/// its CNI code (and whether the runtime retries) from the code, so every
/// variant is mapped explicitly.
impl From<IpamError> for Status {
    fn from(err: IpamError) -> Status {
        let code = match &err {
            IpamError::Exhausted { .. } => Code::ResourceExhausted,
            IpamError::AddressUnavailable { .. } => Code::AlreadyExists,
            IpamError::InvalidArgument(_) | IpamError::UnknownPool(_) => Code::InvalidArgument,
            IpamError::NotFound(_) => Code::NotFound,
            IpamError::Conflict(_) => Code::Aborted,
            IpamError::Cluster(_) | IpamError::Held { .. } => Code::Unavailable,
            IpamError::Store(_) | IpamError::Internal(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

impl From<ReconcileError> for Status {
    fn from(err: ReconcileError) -> Status {
        match err {
            ReconcileError::Ipam(e) => e.into(),
            ReconcileError::Node(e) => Status::internal(format!("reconcile: {e}")),
            ReconcileError::ShuttingDown => Status::unavailable(err.to_string()),
        }
    }
}

/// FAILED_PRECONDITION naming both versions when they are not compatible.
pub fn check_version(client_version: &str) -> Result<(), Status> {
    let server = ferry_proto::PROTOCOL_VERSION;
    if ferry_proto::versions_compatible(client_version, server) {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "client version {client_version:?} is not compatible with ipamd version {server:?}; upgrade the plugin/ipamctl and ipamd together"
        )))
    }
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
