//! Domain types shared by the allocator, the store and the gRPC layer.
//! IPv4 only: the dataplane is /32 routes with a link-local gateway.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub const DEFAULT_POOL: &str = "default";

/// The identity of one attachment. Allocate and Release are idempotent on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AllocKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

/// Container IDs of allocations adopted from a live host veth when the
/// database was rebuilt: `adopted:<host veth name>`, network and ifname empty.
pub const ADOPTED_PREFIX: &str = "adopted:";

impl AllocKey {
    /// The key of an address adopted from host veth `link` (see [`ADOPTED_PREFIX`]).
    pub fn adopted(link: &str) -> AllocKey {
        AllocKey {
            network: String::new(),
            container_id: format!("{ADOPTED_PREFIX}{link}"),
            ifname: String::new(),
        }
    }

    /// The host veth of this attachment: named in the key for adopted
    /// addresses (the plugin's key is unknown), derived from it otherwise.
    pub fn host_veth(&self) -> String {
        match self.container_id.strip_prefix(ADOPTED_PREFIX) {
            Some(link) if self.network.is_empty() && self.ifname.is_empty() => link.to_string(),
            _ => ferry_proto::host_veth_name(&self.container_id, &self.ifname),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub key: AllocKey,
    pub ip: Ipv4Addr,
    pub pool: String,
    pub block: Ipv4Net,
    pub pod: PodMeta,
    pub created_unix_ms: i64,
}

impl Allocation {
    /// The same hand-out of an address, not a later one to the same key.
    pub fn same_lease(&self, other: &Allocation) -> bool {
        self.key == other.key
            && self.ip == other.ip
            && self.created_unix_ms == other.created_unix_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    pub cidr: Ipv4Net,
    pub block_size: u8,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub nat_outgoing: bool,
    #[serde(default)]
    pub snat_address: Option<Ipv4Addr>,
    #[serde(default)]
    pub isolated: bool,
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// Added with `ipamctl pool add` rather than by the configuration: kept
    /// across restarts until `ipamctl pool rm`, whether or not it is in use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub runtime: bool,
}

impl PoolSpec {
    /// Namespace and pool names as they are stored, from a file or a client:
    /// trimmed (empty ones are refused by validation).
    pub fn trimmed_names(names: &[String]) -> Vec<String> {
        names.iter().map(|n| n.trim().to_string()).collect()
    }

    /// A pool for `namespaces` (none: the default pool) with every option off.
    pub fn new(name: &str, cidr: Ipv4Net, block_size: u8, namespaces: Vec<String>) -> Self {
        PoolSpec {
            name: name.to_string(),
            cidr,
            block_size,
            namespaces,
            nat_outgoing: false,
            snat_address: None,
            isolated: false,
            allow_from: Vec::new(),
            runtime: false,
        }
    }

    /// The default pool is the one that serves no namespace in particular.
    pub fn is_default(&self) -> bool {
        self.namespaces.is_empty()
    }
}

/// A block this node has claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub pool: String,
    pub cidr: Ipv4Net,
    pub node: String,
    pub claimed_unix_ms: i64,
}

/// What the plugin asks for on ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocateParams {
    pub key: AllocKey,
    pub pod: PodMeta,
    pub requested_ips: Vec<Ipv4Addr>,
    pub pool_hint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationFilter {
    pub pool: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container_id: Option<String>,
}

impl AllocationFilter {
    pub fn matches(&self, a: &Allocation) -> bool {
        self.pool.as_ref().is_none_or(|p| *p == a.pool)
            && self
                .namespace
                .as_ref()
                .is_none_or(|n| *n == a.pod.namespace)
            && self.pod.as_ref().is_none_or(|p| *p == a.pod.name)
            && self
                .container_id
                .as_ref()
                .is_none_or(|c| a.key.container_id.starts_with(c.as_str()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotAvailable,
    NoAddresses,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub pool: PoolSpec,
    pub is_default: bool,
    /// Usable addresses in the whole pool.
    pub size: u64,
    pub allocated: u64,
    pub cooling: u64,
    pub blocks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    pub claim: BlockClaim,
    pub size: u32,
    pub allocated: u32,
    pub cooling: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressState {
    NotOwned,
    Free,
    Allocated,
    /// Released at some time; reusable from `reusable_unix_ms`.
    Cooling {
        reusable_unix_ms: i64,
    },
    /// Never handed out (the pool's network and broadcast addresses).
    Reserved,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    pub ip: Ipv4Addr,
    pub state: AddressState,
    pub pool: Option<String>,
    pub block: Option<Ipv4Net>,
    pub allocation: Option<Allocation>,
}

/// A difference reconcile found between IPAM state and the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    pub detail: String,
    pub allocation: Option<Allocation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// An allocation whose host veth and pod netns are both gone: the pod
    /// is gone without a DEL. Released after two looks a grace apart.
    LeakedAllocation,
    /// An allocation whose host veth is gone while its pod netns still
    /// exists: kept, since the pod may still be there (or ipamd looks at
    /// the wrong netns).
    MissingVeth,
    /// A host veth of ours with no allocation behind it. Deleted after two
    /// looks a grace apart.
    OrphanVeth,
    /// One address held by two allocations.
    DuplicateAddress,
    /// An allocation outside every block this node owns.
    ForeignBlock,
}

impl FindingKind {
    pub const ALL: [FindingKind; 5] = [
        FindingKind::LeakedAllocation,
        FindingKind::MissingVeth,
        FindingKind::OrphanVeth,
        FindingKind::DuplicateAddress,
        FindingKind::ForeignBlock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::LeakedAllocation => "leaked-allocation",
            FindingKind::MissingVeth => "missing-veth",
            FindingKind::OrphanVeth => "orphan-veth",
            FindingKind::DuplicateAddress => "duplicate-address",
            FindingKind::ForeignBlock => "foreign-block",
        }
    }
}
