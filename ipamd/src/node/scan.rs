//! The addresses the node's live pods use, read from the host side alone:
//! every `fry*` host veth carries one host route `IP/32 dev fryX scope link`
//! (the plugin adds it on ADD). Used to rebuild IPAM state when the
//! database is lost; it needs no pod netns and no runtime.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use super::NodeError;
use super::netlink::table_of;

/// One address in use: `ip` is routed to host veth `link`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VethAddress {
    pub link: String,
    pub ip: Ipv4Addr,
}

/// Lists the `fry*` links and their /32 host routes in this netns (ipamd's,
/// the node's). Opens its own netlink socket; call inside a tokio runtime.
pub async fn host_veth_addresses() -> Result<Vec<VethAddress>, NodeError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeError::Connect)?;
    let conn = tokio::spawn(conn);
    let failed = |op: &str| {
        let op = op.to_string();
        move |source| NodeError::Netlink { op, source }
    };
    let links: Result<Vec<LinkMessage>, _> = handle.link().get().execute().try_collect().await;
    let routes: Result<Vec<RouteMessage>, _> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await;
    conn.abort();
    Ok(pair(
        &links.map_err(failed("list links"))?,
        &routes.map_err(failed("list routes"))?,
    ))
}

/// The /32 scope-link unicast routes of the main table whose output link
/// is a `fry*` link, sorted by link name. A link without such a route (a
/// half-made ADD) yields nothing; one with several yields each.
fn pair(links: &[LinkMessage], routes: &[RouteMessage]) -> Vec<VethAddress> {
    let fry: HashMap<u32, &str> = links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) if n.starts_with(ferry_proto::HOST_VETH_PREFIX) => {
                    Some((l.header.index, n.as_str()))
                }
                _ => None,
            })
        })
        .collect();
    let mut out: Vec<VethAddress> = routes
        .iter()
        .filter(|r| {
            r.header.destination_prefix_length == 32
                && r.header.kind == RouteType::Unicast
                && r.header.scope == RouteScope::Link
                && table_of(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .filter_map(|r| {
            let mut ip = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => ip = Some(*d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let link = fry.get(&oif?)?;
            Some(VethAddress {
                link: link.to_string(),
                ip: ip?,
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m
    }

    fn route(dst: &str, len: u8, oif: u32, scope: RouteScope) -> RouteMessage {
        let mut r = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.parse().unwrap(), len)
            .output_interface(oif)
            .scope(scope)
            .build();
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r
    }

    #[test]
    fn pairs_fry_links_with_their_host_routes() {
        let links = [
            link(1, "lo"),
            link(2, "eth0"),
            link(7, "fryaaaaaaaaaaa"),
            link(8, "fryb0000000000"),
            link(9, "fryc0000000000"),
        ];
        let routes = [
            route("10.244.0.5", 32, 8, RouteScope::Link),
            route("10.244.0.3", 32, 7, RouteScope::Link),
            // Not a pod's host route: wrong device, prefix, or scope.
            route("10.244.0.9", 32, 2, RouteScope::Link),
            route("10.244.0.0", 26, 7, RouteScope::Link),
            route("10.244.0.10", 32, 9, RouteScope::Universe),
            route("192.168.1.1", 32, 99, RouteScope::Link),
        ];
        assert_eq!(
            pair(&links, &routes),
            vec![
                VethAddress {
                    link: "fryaaaaaaaaaaa".into(),
                    ip: "10.244.0.3".parse().unwrap()
                },
                VethAddress {
                    link: "fryb0000000000".into(),
                    ip: "10.244.0.5".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn other_tables_and_blackholes_are_ignored() {
        let links = [link(7, "fryaaaaaaaaaaa")];
        let mut other = route("10.244.0.3", 32, 7, RouteScope::Link);
        other.header.table = 100;
        let mut hole = route("10.244.0.4", 32, 7, RouteScope::Link);
        hole.header.kind = RouteType::BlackHole;
        assert!(pair(&links, &[other, hole]).is_empty());
    }
}
