//! The plugin's view of ipamd, behind a trait so `cmd.rs` can be tested
//! without a daemon. The real client speaks gRPC on the Unix socket.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub mod grpc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addresses: Vec<Ipv4Net>,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub pool: String,
    /// ipamd created the allocation in this call (false: a retried ADD of a
    /// key it already held).
    pub created: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotAvailable,
    NoAddresses,
}

/// Each variant maps to one CNI error code (see `cni::error`).
#[derive(Debug, thiserror::Error)]
pub enum IpamClientError {
    /// Socket missing, connection refused, transport broke: try again (11).
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    AddressUnavailable(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    VersionMismatch(String),
    /// The cluster store could not claim a block now: try again (11).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub trait IpamClient {
    fn allocate(
        &self,
        key: &Key,
        pod: &PodInfo,
        requested: &[Ipv4Addr],
        pool_hint: Option<&str>,
    ) -> Result<Lease, IpamClientError>;
    /// Idempotent; an unknown key is Ok.
    fn release(&self, key: &Key) -> Result<(), IpamClientError>;
    /// Release that also hands ipamd the host veth to delete once the
    /// release is durable. True when ipamd took the deletion over; false
    /// (an older ipamd) leaves it to the caller.
    fn release_and_unplug(
        &self,
        key: &Key,
        host_veth: &str,
        ifindex: u32,
    ) -> Result<bool, IpamClientError>;
    /// The addresses ipamd holds for `key`, None when it holds nothing.
    fn check(&self, key: &Key) -> Result<Option<Vec<Ipv4Net>>, IpamClientError>;
    /// Releases everything of `network` not in `valid`; returns the released keys.
    fn gc(&self, network: &str, valid: &[Key]) -> Result<Vec<Key>, IpamClientError>;
    fn status(&self) -> Result<(Readiness, String), IpamClientError>;
}
