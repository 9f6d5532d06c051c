//! The node-level dataplane in ipamd's own network namespace (always the
//! node's): IP forwarding, a blackhole route per owned block, the pod MTU,
//! and the host veths reconcile compares against.
//!
//! Reconcile and the block-route bookkeeping talk to narrow traits so that
//! their logic runs in unit tests without netlink; [`NodeNet`] is the real
//! implementation.

use std::path::PathBuf;

use futures::future::BoxFuture;
use ipnet::Ipv4Net;

mod netlink;
mod routes;
pub mod scan;
mod sysctl;
mod unplug;

pub use netlink::NodeNet;
pub use routes::RouteReconciler;
pub use sysctl::{IP_FORWARD, ensure_ip_forward};
pub use unplug::Unplugger;

/// Route protocol number marking ferry's routes, so that ferry only ever
/// lists or removes routes it added itself.
pub const ROUTE_PROTOCOL: u8 = 0x66;

/// Bytes an IPIP header adds; the pod MTU is the underlay's minus this.
pub const IPIP_OVERHEAD: u32 = 20;

/// Used when no usable interface tells us the underlay MTU.
pub const FALLBACK_UNDERLAY_MTU: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("netlink {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One of ferry's host veths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostLink {
    pub name: String,
    pub index: u32,
}

/// What reconcile and DEL need from the host: ferry's host veths.
pub trait HostLinks: Send + Sync {
    /// ferry's host veths in this netns ([`LinkInfo::is_ferry_veth`]).
    fn fry_links(&self) -> BoxFuture<'_, Result<Vec<HostLink>, NodeError>>;
    /// Deletes the link with `link.index` if it still bears `link.name` and
    /// is a ferry veth. False when it is gone or is now another link.
    fn delete_link<'a>(&'a self, link: &'a HostLink) -> BoxFuture<'a, Result<bool, NodeError>>;
    /// The /32 of each of ferry's host veths (the pod addresses in use).
    fn veth_addresses(&self) -> BoxFuture<'_, Result<Vec<scan::VethAddress>, NodeError>>;
    /// Both of the above, at one moment; an implementation may share the
    /// links dump.
    fn fry_links_and_addresses(&self) -> BoxFuture<'_, Result<LinksAndAddresses, NodeError>> {
        Box::pin(async move { Ok((self.fry_links().await?, self.veth_addresses().await?)) })
    }
}

/// ferry's host veths, and the /32 each routes.
pub type LinksAndAddresses = (Vec<HostLink>, Vec<scan::VethAddress>);

/// What ipamd asks of the node once at start, after its state is open.
pub trait NodeSetup: Send + Sync {
    /// Turns IPv4 forwarding on; true when it was off.
    fn enable_forwarding(&self) -> Result<bool, NodeError>;
    /// The MTU of the interface pod traffic leaves by.
    fn underlay_mtu(&self) -> BoxFuture<'_, Result<u32, NodeError>>;
}

/// Blackhole routes for owned blocks, marked with [`ROUTE_PROTOCOL`].
pub trait BlockRoutes: Send + Sync {
    /// Idempotent: an existing route is success.
    fn add_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>>;
    /// Idempotent: a missing route is success.
    fn remove_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>>;
    /// The blackhole routes ferry added (by protocol).
    fn blackholes(&self) -> BoxFuture<'_, Result<Vec<Ipv4Net>, NodeError>>;
}

/// One interface as the MTU detection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    pub veth: bool,
}

impl LinkInfo {
    /// A host veth ferry made: its name alone is not proof (`frybr0`).
    pub fn is_ferry_veth(&self) -> bool {
        self.veth && ferry_proto::is_host_veth_name(&self.name)
    }
}

/// The underlay MTU: that of the interface holding the default route, else
/// the smallest of the up, non-loopback, non-ferry interfaces, else 1500.
pub fn underlay_mtu(links: &[LinkInfo], default_route_oif: Option<u32>) -> u32 {
    let via_default = default_route_oif
        .and_then(|oif| links.iter().find(|l| l.index == oif))
        .filter(|l| l.mtu > 0);
    if let Some(link) = via_default {
        return link.mtu;
    }
    links
        .iter()
        .filter(|l| l.up && !l.loopback && l.mtu > 0 && !l.is_ferry_veth())
        .map(|l| l.mtu)
        .min()
        .unwrap_or(FALLBACK_UNDERLAY_MTU)
}

/// The MTU pods get: underlay minus IPIP overhead.
pub fn pod_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(IPIP_OVERHEAD)
}

#[cfg(test)]
pub mod fake {
    //! In-memory stand-ins for the host, for unit tests.

    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use ipnet::Ipv4Net;

    use super::{BlockRoutes, FALLBACK_UNDERLAY_MTU, HostLink, HostLinks, NodeError, NodeSetup};

    #[derive(Default)]
    pub struct FakeHost {
        pub links: Mutex<Vec<HostLink>>,
        pub deleted: Mutex<Vec<HostLink>>,
        pub routes: Mutex<BTreeSet<Ipv4Net>>,
        pub route_ops: Mutex<Vec<String>>,
        /// How many of the next route changes fail.
        pub failing_route_ops: Mutex<usize>,
    }

    impl FakeHost {
        /// Index = 100 + position, stable for a name's position.
        pub fn set_links(&self, links: &[&str]) {
            *self.links.lock().unwrap() = links
                .iter()
                .zip(100..)
                .map(|(name, index)| HostLink {
                    name: name.to_string(),
                    index,
                })
                .collect();
        }

        /// Counts down [`FakeHost::failing_route_ops`]; true while it lasts.
        fn route_op_fails(&self) -> bool {
            let mut n = self.failing_route_ops.lock().unwrap();
            let fails = *n > 0;
            *n = n.saturating_sub(1);
            fails
        }

        pub fn names(&self) -> Vec<String> {
            let links = self.links.lock().unwrap();
            links.iter().map(|l| l.name.clone()).collect()
        }
    }

    /// Polls `check` until it holds; panics naming `what` after `within`.
    pub async fn eventually(
        what: &str,
        within: std::time::Duration,
        mut check: impl FnMut() -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    fn injected_failure() -> NodeError {
        NodeError::Io {
            path: "/fake".into(),
            source: std::io::Error::other("injected"),
        }
    }

    impl HostLinks for FakeHost {
        fn fry_links(&self) -> BoxFuture<'_, Result<Vec<HostLink>, NodeError>> {
            let links = self.links.lock().unwrap().clone();
            Box::pin(async move { Ok(links) })
        }
        fn delete_link<'a>(&'a self, link: &'a HostLink) -> BoxFuture<'a, Result<bool, NodeError>> {
            let mut links = self.links.lock().unwrap();
            let before = links.len();
            links.retain(|l| l != link);
            let deleted = links.len() < before;
            if deleted {
                self.deleted.lock().unwrap().push(link.clone());
            }
            Box::pin(async move { Ok(deleted) })
        }
        // Links only: no pod addresses.
        fn veth_addresses(
            &self,
        ) -> BoxFuture<'_, Result<Vec<super::scan::VethAddress>, NodeError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    /// Forwarding already on; the common Ethernet MTU.
    impl NodeSetup for FakeHost {
        fn enable_forwarding(&self) -> Result<bool, NodeError> {
            Ok(false)
        }
        fn underlay_mtu(&self) -> BoxFuture<'_, Result<u32, NodeError>> {
            Box::pin(async { Ok(FALLBACK_UNDERLAY_MTU) })
        }
    }

    impl BlockRoutes for FakeHost {
        fn add_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>> {
            if self.route_op_fails() {
                return Box::pin(async { Err(injected_failure()) });
            }
            self.route_ops.lock().unwrap().push(format!("add {block}"));
            self.routes.lock().unwrap().insert(block);
            Box::pin(async { Ok(()) })
        }
        fn remove_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>> {
            if self.route_op_fails() {
                return Box::pin(async { Err(injected_failure()) });
            }
            self.route_ops.lock().unwrap().push(format!("del {block}"));
            self.routes.lock().unwrap().remove(&block);
            Box::pin(async { Ok(()) })
        }
        fn blackholes(&self) -> BoxFuture<'_, Result<Vec<Ipv4Net>, NodeError>> {
            let routes = self.routes.lock().unwrap().iter().copied().collect();
            Box::pin(async move { Ok(routes) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mtu: u32, up: bool) -> LinkInfo {
        LinkInfo {
            index,
            name: name.to_string(),
            mtu,
            up,
            loopback: name == "lo",
            veth: name.starts_with("fry"),
        }
    }

    #[test]
    fn mtu_prefers_the_default_route_interface() {
        let links = [
            link(1, "lo", 65536, true),
            link(2, "eth0", 9000, true),
            link(3, "eth1", 1400, true),
        ];
        assert_eq!(underlay_mtu(&links, Some(2)), 9000);
        assert_eq!(pod_mtu(underlay_mtu(&links, Some(2))), 8980);
    }

    #[test]
    fn mtu_falls_back_to_smallest_usable_then_1500() {
        let links = [
            link(1, "lo", 65536, true),
            link(2, "eth0", 9000, true),
            link(3, "eth1", 1450, true),
            link(4, "eth2", 1200, false),
            link(5, "fry0123456789a", 1000, true),
        ];
        assert_eq!(underlay_mtu(&links, None), 1450);
        // A default route through a link we do not see falls back too.
        assert_eq!(underlay_mtu(&links, Some(42)), 1450);
        assert_eq!(underlay_mtu(&links[..1], None), 1500);
        assert_eq!(underlay_mtu(&[], None), 1500);
        assert_eq!(pod_mtu(1500), 1480);
    }
}
