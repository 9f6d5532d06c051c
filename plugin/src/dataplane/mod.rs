//! The pod's side of the dataplane (its veth pair, addresses, routes and
//! gateway neighbour) behind a narrow trait, so that `cmd.rs` can be tested
//! with a recording fake.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

pub mod linux;

/// Everything needed to wire one pod attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub netns: PathBuf,
    /// The interface inside the pod, usually eth0.
    pub ifname: String,
    /// `fry…`, from `ferry_proto::host_veth_name`.
    pub host_veth: String,
    /// Each a /32.
    pub addresses: Vec<Ipv4Net>,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The address was allocated afresh, so a host veth of this name is
    /// left from an attachment whose address was released (its DEL's
    /// background delete not done yet, or lost in a crash): setup replaces
    /// it even when `ifname` in the pod is its peer. A host veth that does
    /// not route this lease's addresses is replaced either way.
    pub replace_stale: bool,
}

/// What ADD reports back in the CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("network namespace {path} does not exist")]
    NetnsMissing { path: PathBuf },
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `attached` when our host veth exists too: the interface is the live
    /// attachment of this very key, whose address must be left alone.
    #[error("interface {ifname} already exists in {netns}")]
    InterfaceExists {
        ifname: String,
        netns: PathBuf,
        attached: bool,
    },
    #[error("{op}: {detail}")]
    Netlink { op: String, detail: String },
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// CHECK found the pod wired differently from what it should be.
    #[error("{0}")]
    Mismatch(String),
}

/// Sync: DEL tears down on one thread while it releases the address on another.
pub trait Dataplane: Sync {
    /// Creates the veth with its peer directly in the pod netns, addresses
    /// and routes both sides. A stale host veth named `host_veth` is removed
    /// first. Leaves nothing behind when it fails.
    fn setup(&self, link: &PodLink) -> Result<Attached, DataplaneError>;

    /// Deletes the host veth, which takes its peer and the /32 routes with
    /// it; success when it is already gone. Only the host end proves a veth
    /// is ours (both ends are created together), so nothing in the pod netns
    /// is touched: an interface there without our host end belongs to
    /// someone else.
    fn teardown(&self, host_veth: &str) -> Result<(), DataplaneError>;

    /// The ifindex of the host veth, `None` when it does not exist. DEL hands
    /// it to ipamd, which deletes the link by that index.
    fn host_link_index(&self, host_veth: &str) -> Result<Option<u32>, DataplaneError>;

    /// Verifies the interfaces, addresses and routes of both sides.
    fn check(&self, link: &PodLink) -> Result<(), DataplaneError>;
}
