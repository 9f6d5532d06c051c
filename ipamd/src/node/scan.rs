//! The addresses the node's live pods use, read from the host side alone:
//! every host veth of ferry's (named `fry` + 11 hex, kind veth) carries one host route `IP/32 dev fryX scope link`
//! (the plugin adds it on ADD). Used to rebuild IPAM state when the
//! database is lost, through [`super::HostLinks::veth_addresses`]; it needs
//! no pod netns and no runtime.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};

use super::LinkInfo;
use super::netlink::{link_info, table_of};

/// One address in use: `ip` is routed to host veth `link`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VethAddress {
    pub link: String,
    pub ip: Ipv4Addr,
}

/// The /32 scope-link unicast routes of the main table whose output link
/// is one of ferry's host veths, sorted by link name. A link without such a route (a
/// half-made ADD) yields nothing; one with several yields each.
pub(crate) fn pair(links: &[LinkMessage], routes: &[RouteMessage]) -> Vec<VethAddress> {
    let fry: HashMap<u32, String> = links
        .iter()
        .map(link_info)
        .filter(LinkInfo::is_ferry_veth)
        .map(|l| (l.index, l.name))
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
                link: link.clone(),
                ip: ip?,
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo as LinkInfoAttr};
    use rtnetlink::RouteMessageBuilder;

    use super::*;

    fn link_of_kind(index: u32, name: &str, kind: InfoKind) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfoAttr::Kind(kind)]));
        m
    }

    fn link(index: u32, name: &str) -> LinkMessage {
        link_of_kind(index, name, InfoKind::Veth)
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
    fn links_that_only_look_like_ferrys_are_ignored() {
        let links = [
            link_of_kind(7, "frybr0", InfoKind::Bridge),
            link(8, "fry-other"),
            link_of_kind(9, "fry0123456789a", InfoKind::Dummy),
        ];
        let routes = [
            route("10.244.0.3", 32, 7, RouteScope::Link),
            route("10.244.0.4", 32, 8, RouteScope::Link),
            route("10.244.0.5", 32, 9, RouteScope::Link),
        ];
        assert!(pair(&links, &routes).is_empty());
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
