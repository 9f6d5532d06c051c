//! rtnetlink implementation of the node traits, on one netlink socket in
//! ipamd's own netns.

use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as LinkInfoAttr, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::scan::{self, VethAddress};
use super::{
    BlockRoutes, HostLink, HostLinks, LinkInfo, LinksAndAddresses, NodeError, NodeSetup,
    ROUTE_PROTOCOL, underlay_mtu,
};

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;
const ESRCH: i32 = libc::ESRCH;

/// The node's netns as netlink shows it.
#[derive(Clone)]
pub struct NodeNet {
    handle: Handle,
    /// The kernel runs one dump at a time per socket and answers EBUSY to a
    /// second (reconcile's look racing `ipamctl gc`, say).
    dumps: Arc<tokio::sync::Mutex<()>>,
}

impl NodeNet {
    /// Opens the netlink socket; must run inside a tokio runtime, which
    /// drives the connection.
    pub fn new() -> Result<Self, NodeError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeError::Connect)?;
        tokio::spawn(conn);
        Ok(NodeNet {
            handle,
            dumps: Arc::default(),
        })
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NodeError> {
        let _one_dump = self.dumps.lock().await;
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NodeError::Netlink {
                op: "list links".into(),
                source,
            })
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>, NodeError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let _one_dump = self.dumps.lock().await;
        self.handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NodeError::Netlink {
                op: "list routes".into(),
                source,
            })
    }
}

impl NodeSetup for NodeNet {
    fn enable_forwarding(&self) -> Result<bool, NodeError> {
        super::ensure_ip_forward(std::path::Path::new(super::IP_FORWARD))
    }

    /// See [`underlay_mtu`].
    fn underlay_mtu(&self) -> BoxFuture<'_, Result<u32, NodeError>> {
        Box::pin(async move {
            let links: Vec<LinkInfo> = self.links().await?.iter().map(link_info).collect();
            let routes = self.ipv4_routes().await?;
            Ok(underlay_mtu(&links, default_route_oif(&routes)))
        })
    }
}

pub(super) fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
        veth: false,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name = name.clone(),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                info.veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfoAttr::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    info
}

/// The output interface of the main table's IPv4 default route with the
/// lowest metric (first next hop when it is multipath).
fn default_route_oif(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter(|r| {
            r.header.destination_prefix_length == 0
                && r.header.kind == RouteType::Unicast
                && table_of(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .filter_map(|r| {
            let mut oif = None;
            let mut metric = 0u32;
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::MultiPath(hops) if oif.is_none() => {
                        oif = hops.first().map(|h| h.interface_index)
                    }
                    RouteAttribute::Priority(p) => metric = *p,
                    _ => {}
                }
            }
            oif.map(|o| (metric, o))
        })
        .min()
        .map(|(_, oif)| oif)
}

pub(super) fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn destination(r: &RouteMessage) -> Option<Ipv4Net> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, r.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

fn blackhole_message(block: Ipv4Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(block.network(), block.prefix_len())
        .kind(RouteType::BlackHole)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build()
}

/// The errno of a netlink NACK, positive.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn ferry_veths(links: &[LinkMessage]) -> Vec<HostLink> {
    links
        .iter()
        .map(link_info)
        .filter(LinkInfo::is_ferry_veth)
        .map(|l| HostLink {
            name: l.name,
            index: l.index,
        })
        .collect()
}

impl HostLinks for NodeNet {
    fn veth_addresses(&self) -> BoxFuture<'_, Result<Vec<VethAddress>, NodeError>> {
        Box::pin(async move {
            let links = self.links().await?;
            let routes = self.ipv4_routes().await?;
            Ok(scan::pair(&links, &routes))
        })
    }

    fn fry_links(&self) -> BoxFuture<'_, Result<Vec<HostLink>, NodeError>> {
        Box::pin(async move { Ok(ferry_veths(&self.links().await?)) })
    }

    fn fry_links_and_addresses(&self) -> BoxFuture<'_, Result<LinksAndAddresses, NodeError>> {
        Box::pin(async move {
            let links = self.links().await?;
            let routes = self.ipv4_routes().await?;
            Ok((ferry_veths(&links), scan::pair(&links, &routes)))
        })
    }

    fn delete_link<'a>(&'a self, link: &'a HostLink) -> BoxFuture<'a, Result<bool, NodeError>> {
        Box::pin(async move {
            let failed = |op: &str, source| NodeError::Netlink {
                op: format!("{op} link {} (index {})", link.name, link.index),
                source,
            };
            let mut replies = self.handle.link().get().match_index(link.index).execute();
            let current = match replies.try_next().await {
                Ok(Some(msg)) => link_info(&msg),
                Ok(None) => return Ok(false),
                Err(e) if errno(&e) == Some(ENODEV) => return Ok(false),
                Err(e) => return Err(failed("get", e)),
            };
            // Indexes are not reused soon, but a name check costs nothing;
            // and a caller's name is no proof the link is ferry's.
            if current.name != link.name || !current.is_ferry_veth() {
                return Ok(false);
            }
            match self.handle.link().del(link.index).execute().await {
                Ok(()) => Ok(true),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
                Err(e) => Err(failed("delete", e)),
            }
        })
    }
}

impl BlockRoutes for NodeNet {
    fn add_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>> {
        Box::pin(async move {
            match self
                .handle
                .route()
                .add(blackhole_message(block))
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                Err(source) => Err(NodeError::Netlink {
                    op: format!("add blackhole route {block}"),
                    source,
                }),
            }
        })
    }

    fn remove_blackhole(&self, block: Ipv4Net) -> BoxFuture<'_, Result<(), NodeError>> {
        Box::pin(async move {
            match self
                .handle
                .route()
                .del(blackhole_message(block))
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ESRCH) => Ok(()),
                Err(source) => Err(NodeError::Netlink {
                    op: format!("delete blackhole route {block}"),
                    source,
                }),
            }
        })
    }

    fn blackholes(&self) -> BoxFuture<'_, Result<Vec<Ipv4Net>, NodeError>> {
        Box::pin(async move {
            Ok(self
                .ipv4_routes()
                .await?
                .iter()
                .filter(|r| {
                    r.header.kind == RouteType::BlackHole
                        && u8::from(r.header.protocol) == ROUTE_PROTOCOL
                        && table_of(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
                })
                .filter_map(destination)
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blackhole_message_is_marked_as_ours() {
        let m = blackhole_message("10.244.1.0/26".parse().unwrap());
        assert_eq!(m.header.kind, RouteType::BlackHole);
        assert_eq!(u8::from(m.header.protocol), ROUTE_PROTOCOL);
        assert_eq!(m.header.destination_prefix_length, 26);
        assert_eq!(destination(&m), Some("10.244.1.0/26".parse().unwrap()));
    }

    #[test]
    fn picks_lowest_metric_default_route() {
        let mut a = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(3)
            .priority(200)
            .build();
        a.header.destination_prefix_length = 0;
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(2)
            .priority(100)
            .build();
        b.header.destination_prefix_length = 0;
        let c = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 0, 0, 0), 8)
            .output_interface(9)
            .build();
        assert_eq!(default_route_oif(&[a.clone(), b, c.clone()]), Some(2));
        assert_eq!(default_route_oif(&[c]), None);
        assert_eq!(default_route_oif(&[a]), Some(3));
    }
}
