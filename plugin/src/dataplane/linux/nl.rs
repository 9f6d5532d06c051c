//! Small netlink helpers over an rtnetlink `Handle`: one request each, looked
//! up by name (never a full link dump).

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::dataplane::DataplaneError;

/// The bits of a link the dataplane cares about.
#[derive(Debug, Clone)]
pub(super) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    pub is_veth: bool,
    /// IFLA_LINK: a veth's peer index, in `peer_netnsid`'s netns if set.
    pub peer_index: Option<u32>,
    pub peer_netnsid: Option<i32>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            is_veth: false,
            peer_index: None,
            peer_netnsid: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Link(index) => link.peer_index = Some(*index),
                LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
                LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(&bytes[..]).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    link.is_veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        link
    }
}

/// The positive errno carried by a netlink error reply, if any.
pub(super) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

pub(super) fn failed(op: impl Into<String>, err: rtnetlink::Error) -> DataplaneError {
    let detail = match &err {
        // The kernel's errno text is more useful than the debug dump of the
        // echoed request that rtnetlink's Display adds.
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
        other => other.to_string(),
    };
    DataplaneError::Netlink {
        op: op.into(),
        detail,
    }
}

/// Opens a netlink route socket in the calling thread's netns and drives it
/// on the current (current-thread) runtime.
pub(super) fn connect() -> Result<Handle, DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DataplaneError::Netlink {
        op: "open netlink socket".into(),
        detail: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// RTM_GETLINK by name; `None` when there is no such link.
pub(super) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, DataplaneError> {
    let mut replies = h.link().get().match_name(name).execute();
    match replies.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(failed(format!("get link {name}"), e)),
    }
}

/// RTM_GETLINK by index; `None` when there is no such link.
pub(super) async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>, DataplaneError> {
    let mut replies = h.link().get().match_index(index).execute();
    match replies.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(failed(format!("get link {index}"), e)),
    }
}

/// RTM_DELLINK by name in one round trip; `false` when it did not exist.
pub(super) async fn delete_link_by_name(h: &Handle, name: &str) -> Result<bool, DataplaneError> {
    let msg = LinkUnspec::new_with_name(name).build();
    match h.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(failed(format!("delete link {name}"), e)),
    }
}

pub(super) async fn set_up(h: &Handle, msg: LinkMessage, name: &str) -> Result<(), DataplaneError> {
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| failed(format!("set {name} up"), e))
}

/// `dst/len dev <index> scope link [via gw]`, in the main table.
pub(super) fn route(
    dst: Ipv4Addr,
    len: u8,
    oif: u32,
    gateway: Option<Ipv4Addr>,
    scope: RouteScope,
) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, len)
        .output_interface(oif)
        .scope(scope);
    if let Some(gw) = gateway {
        builder = builder.gateway(gw);
    }
    builder.build()
}

pub(super) async fn add_route(
    h: &Handle,
    msg: RouteMessage,
    replace: bool,
    what: &str,
) -> Result<(), DataplaneError> {
    let req = h.route().add(msg);
    let req = if replace { req.replace() } else { req };
    req.execute()
        .await
        .map_err(|e| failed(format!("add route {what}"), e))
}

pub(super) async fn add_address(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    ifname: &str,
) -> Result<(), DataplaneError> {
    h.address()
        .add(index, IpAddr::V4(ip), 32)
        .execute()
        .await
        .map_err(|e| failed(format!("add address {ip}/32 to {ifname}"), e))
}

/// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
pub(super) async fn add_permanent_neighbour(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    ifname: &str,
) -> Result<(), DataplaneError> {
    h.neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            failed(
                format!("add neighbour {ip} lladdr {} dev {ifname}", show_mac(&mac)),
                e,
            )
        })
}

/// The neighbour entry for `ip` on link `index`: its state and MAC.
pub(super) async fn neighbour(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
) -> Result<Option<(NeighbourState, Option<[u8; 6]>)>, DataplaneError> {
    let all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(|e| failed("dump neighbours", e))?;
    Ok(all
        .iter()
        .filter(|m| m.header.ifindex == index)
        .find_map(|m| {
            let mut dst = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(&l[..]).ok()
                    }
                    _ => {}
                }
            }
            (dst == Some(ip)).then_some((m.header.state, mac))
        }))
}

pub(super) fn show_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The main-table route the kernel would use for `dst` (`ip route get
/// fibmatch`): one lookup instead of dumping a table that grows with pods.
pub(super) async fn fib_match(h: &Handle, dst: Ipv4Addr) -> Result<Option<Route>, DataplaneError> {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .build();
    msg.header.flags |= RouteFlags::FibMatch;
    let mut replies = h.route().get(msg).execute();
    match replies.try_next().await {
        Ok(found) => Ok(found.map(|m| Route::from_message(&m))),
        // EINVAL: the matching route's device is being unregistered (a
        // veth deleted concurrently), so there is no usable route either.
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(failed(format!("look up route to {dst}"), e)),
    }
}

/// Every IPv4 route of the main table (used only inside a pod netns, where
/// the table is tiny).
pub(super) async fn main_routes(h: &Handle) -> Result<Vec<Route>, DataplaneError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all: Vec<RouteMessage> = h
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| failed("dump routes", e))?;
    Ok(all
        .iter()
        .filter(|m| m.header.table == RouteHeader::RT_TABLE_MAIN)
        .map(Route::from_message)
        .collect())
}

/// IPv4 addresses (with prefix length) on link `index`.
pub(super) async fn addresses(
    h: &Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8)>, DataplaneError> {
    let mut req = h.address().get().set_link_index_filter(index);
    req.message_mut().header.family = AddressFamily::Inet;
    let all: Vec<AddressMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| failed("dump addresses", e))?;
    let mut out: Vec<(Ipv4Addr, u8)> = all
        .iter()
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                _ => None,
            })
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The parts of a route the checks compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Route {
    pub dst: Ipv4Addr,
    pub len: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub scope: RouteScope,
}

impl Route {
    fn from_message(msg: &RouteMessage) -> Self {
        let mut route = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            len: msg.header.destination_prefix_length,
            oif: None,
            gateway: None,
            scope: msg.header.scope,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        route
    }
}
