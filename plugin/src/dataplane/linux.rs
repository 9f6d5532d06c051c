//! Linux netlink Dataplane: netlink inside a pod netns runs on a dedicated thread that has entered it.
//!
//! The plugin runs in the node's netns; host-side netlink uses a socket opened
//! there. Each operation drives one current-thread runtime on the calling
//! thread (or on a helper thread when the caller is already inside a tokio
//! runtime), opens one netlink socket per netns, and starts at most one pod
//! netns worker ([`podns::PodNetns`]). Host and pod sides are configured
//! concurrently.

mod nl;
mod podns;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth};
use tracing::{debug, warn};

use super::{Attached, Dataplane, DataplaneError, PodLink};
use podns::PodNetns;

/// The host side's MAC, as Calico does: proxy_arp answers for the gateway,
/// so the pod never needs to learn a real per-veth address.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxDataplane;

impl LinuxDataplane {
    pub fn new() -> Self {
        LinuxDataplane
    }
}

impl Dataplane for LinuxDataplane {
    fn setup(&self, link: &PodLink) -> Result<Attached, DataplaneError> {
        let started = Instant::now();
        let result = drive(setup(link));
        debug!(
            host_veth = %link.host_veth,
            ok = result.is_ok(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "dataplane setup"
        );
        result
    }

    fn teardown(&self, host_veth: &str) -> Result<(), DataplaneError> {
        let started = Instant::now();
        let result = drive(teardown(host_veth));
        debug!(
            host_veth,
            ok = result.is_ok(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "dataplane teardown"
        );
        result
    }

    fn host_link_index(&self, host_veth: &str) -> Result<Option<u32>, DataplaneError> {
        drive(async {
            let host = nl::connect()?;
            Ok(nl::link_by_name(&host, host_veth).await?.map(|l| l.index))
        })
    }

    fn check(&self, link: &PodLink) -> Result<(), DataplaneError> {
        drive(check(link))
    }
}

/// Runs one operation to completion on a fresh current-thread runtime.
fn drive<T: Send>(
    operation: impl Future<Output = Result<T, DataplaneError>> + Send,
) -> Result<T, DataplaneError> {
    let run = move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| DataplaneError::Netlink {
                op: "start netlink runtime".into(),
                detail: e.to_string(),
            })?;
        runtime.block_on(operation)
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        // A runtime cannot block inside another one. The helper thread is
        // spawned from this one, so it inherits the same (node) netns.
        std::thread::scope(|s| s.spawn(run).join()).unwrap_or_else(|_| {
            Err(DataplaneError::Netlink {
                op: "dataplane".into(),
                detail: "netlink thread panicked".into(),
            })
        })
    } else {
        run()
    }
}

enum NetnsFile {
    Open(Arc<File>),
    Missing,
    /// The path exists but is no netns: typically a runtime's leftover file
    /// after the bind mount went away.
    NotNetns,
}

fn try_open_netns(path: &Path) -> Result<NetnsFile, DataplaneError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(NetnsFile::Missing),
        Err(source) => {
            return Err(DataplaneError::Netns {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    match fstatfs(&file) {
        Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => Ok(NetnsFile::Open(Arc::new(file))),
        Ok(_) => Ok(NetnsFile::NotNetns),
        Err(errno) => Err(DataplaneError::Netns {
            path: path.to_path_buf(),
            source: errno.into(),
        }),
    }
}

fn open_netns(path: &Path) -> Result<Arc<File>, DataplaneError> {
    match try_open_netns(path)? {
        NetnsFile::Open(file) => Ok(file),
        NetnsFile::Missing => Err(DataplaneError::NetnsMissing {
            path: path.to_path_buf(),
        }),
        NetnsFile::NotNetns => Err(DataplaneError::Netns {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace"),
        }),
    }
}

async fn setup(link: &PodLink) -> Result<Attached, DataplaneError> {
    let netns = open_netns(&link.netns)?;
    let host = nl::connect()?;
    let mut pod = PodNetns::start(Arc::clone(&netns), &link.netns)?;

    // ifname first: if it exists, our host veth of the same name may be its
    // live peer, and deleting that as "stale" would unplug a running pod -
    // unless that veth belongs to an earlier lease: the address was just
    // allocated, or the veth routes other addresses than this lease's (the
    // reply that said "created" can be lost when ipamd dies).
    let mut stale_removed = false;
    let mut waited = false;
    loop {
        let ifname = link.ifname.clone();
        let Some(existing) = pod
            .run(move |h| async move { nl::link_by_name(&h, &ifname).await })
            .await?
        else {
            break;
        };
        let ours = nl::link_by_name(&host, &link.host_veth).await?;
        let attached = ours.is_some();
        let stale = match &ours {
            Some(veth) => link.replace_stale || !routes_lease(&host, veth, link).await?,
            None => false,
        };
        if stale && !stale_removed {
            stale_removed = true;
            nl::delete_link_by_name(&host, &link.host_veth).await?;
            debug!(host_veth = %link.host_veth, "removed the stale veth pair of a released attachment");
            continue;
        }
        // Another attachment's ferry pair, its DEL done and its host veth
        // queued for deletion in ipamd (or deleted since the lookup above):
        // wait for it, briefly.
        if !attached && !waited && peer_is_departing_ferry_veth(&host, &existing).await? {
            waited = true;
            wait_until_gone(&mut pod, &link.ifname, DEPARTING_PAIR_WAIT).await?;
            continue;
        }
        return Err(interface_exists(link, attached));
    }
    // A host veth left by an earlier ADD would block the deterministic name.
    if !stale_removed && nl::delete_link_by_name(&host, &link.host_veth).await? {
        debug!(host_veth = %link.host_veth, "removed stale host veth");
    }

    create_veth(&host, &mut pod, link, &netns).await?;

    let pod_side = PodSide::of(link);
    let (host_done, pod_mac) = tokio::join!(
        wire_host(&host, link),
        pod.run(move |h| wire_pod(h, pod_side)),
    );
    match host_done.and(pod_mac) {
        Ok(pod_mac) => Ok(Attached {
            host_mac: HOST_VETH_MAC,
            pod_mac,
        }),
        Err(e) => {
            // Deleting one end removes both, and the host routes with it.
            if let Err(cleanup) = nl::delete_link_by_name(&host, &link.host_veth).await {
                warn!(host_veth = %link.host_veth, error = %cleanup, "cleanup after failed setup");
            }
            Err(e)
        }
    }
}

/// Whether `veth` carries every address of this lease as its /32 route.
async fn routes_lease(
    host: &Handle,
    veth: &nl::Link,
    link: &PodLink,
) -> Result<bool, DataplaneError> {
    for net in &link.addresses {
        if !routed_via(host, net.addr(), veth.index).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn routed_via(host: &Handle, ip: Ipv4Addr, index: u32) -> Result<bool, DataplaneError> {
    Ok(nl::fib_match(host, ip)
        .await?
        .is_some_and(|r| r.len == 32 && r.dst == ip && r.oif == Some(index)))
}

/// How long ADD waits for a departing ferry pair to leave the pod's
/// interface name free; ipamd deletes them within milliseconds.
const DEPARTING_PAIR_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A veth in the pod whose peer, in the node netns, is one of ferry's host
/// veths or was deleted a moment ago. A peer in the pod's own netns is
/// someone else's pair.
async fn peer_is_departing_ferry_veth(
    host: &Handle,
    pod_link: &nl::Link,
) -> Result<bool, DataplaneError> {
    let (true, Some(peer), Some(_)) =
        (pod_link.is_veth, pod_link.peer_index, pod_link.peer_netnsid)
    else {
        return Ok(false);
    };
    Ok(nl::link_by_index(host, peer)
        .await?
        .is_none_or(|l| l.name.starts_with(ferry_proto::HOST_VETH_PREFIX)))
}

async fn wait_until_gone(
    pod: &mut PodNetns,
    ifname: &str,
    limit: std::time::Duration,
) -> Result<(), DataplaneError> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let name = ifname.to_string();
        let present = pod
            .run(move |h| async move { nl::link_by_name(&h, &name).await })
            .await?
            .is_some();
        if !present {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

fn interface_exists(link: &PodLink, attached: bool) -> DataplaneError {
    DataplaneError::InterfaceExists {
        ifname: link.ifname.clone(),
        netns: link.netns.clone(),
        attached,
    }
}

/// One RTM_NEWLINK: host end here, peer created straight inside the pod netns
/// (IFLA_NET_NS_FD on the peer), so no later namespace move is needed.
async fn create_veth(
    host: &Handle,
    pod: &mut PodNetns,
    link: &PodLink,
    netns: &File,
) -> Result<(), DataplaneError> {
    let mut peer = LinkUnspec::new_with_name(&link.ifname).setns_by_fd(netns.as_raw_fd());
    let mut builder = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(link.host_veth.clone())
        .address(HOST_VETH_MAC.to_vec());
    if link.mtu > 0 {
        peer = peer.mtu(link.mtu);
        builder = builder.mtu(link.mtu);
    }
    let msg = builder
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    match host.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if nl::errno(&e) == Some(libc::EEXIST) => {
            // The stale host veth is gone, so the clash is most likely ifname
            // appearing in the pod netns since we looked.
            let ifname = link.ifname.clone();
            let there = pod
                .run(move |h| async move { nl::link_by_name(&h, &ifname).await })
                .await?;
            if there.is_some() {
                // Our host end does not exist (we just cleared it), so this
                // interface is someone else's.
                Err(interface_exists(link, false))
            } else {
                Err(nl::failed(format!("create veth {}", link.host_veth), e))
            }
        }
        Err(e) => Err(nl::failed(
            format!("create veth {} with peer {}", link.host_veth, link.ifname),
            e,
        )),
    }
}

/// Node side: proxy ARP without delay, forwarding, link up, one /32 route per
/// pod address.
async fn wire_host(host: &Handle, link: &PodLink) -> Result<(), DataplaneError> {
    let name = &link.host_veth;
    let veth = nl::link_by_name(host, name)
        .await?
        .ok_or_else(|| DataplaneError::Netlink {
            op: format!("get link {name}"),
            detail: "vanished right after it was created".into(),
        })?;
    // /proc/sys/net resolves in this thread's netns, the node's.
    write_sysctl(b"1", &format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp"))?;
    write_sysctl(
        b"0",
        &format!("/proc/sys/net/ipv4/neigh/{name}/proxy_delay"),
    )?;
    write_sysctl(b"1", &format!("/proc/sys/net/ipv4/conf/{name}/forwarding"))?;
    // Up before routing: the kernel refuses routes via a down device.
    nl::set_up(
        host,
        LinkUnspec::new_with_index(veth.index).up().build(),
        name,
    )
    .await?;
    try_join_all(link.addresses.iter().map(|net| {
        let ip = net.addr();
        let route = nl::route(ip, 32, veth.index, None, RouteScope::Link);
        async move {
            // Replace: a leftover route for this IP must not fail ADD.
            nl::add_route(host, route, true, &format!("{ip}/32 dev {name}")).await
        }
    }))
    .await?;
    Ok(())
}

fn write_sysctl(value: &[u8], path: &str) -> Result<(), DataplaneError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value))
        .map_err(|source| DataplaneError::Sysctl {
            path: path.to_string(),
            source,
        })
}

/// What the pod netns worker needs to wire ifname; owned, as it crosses to
/// the worker thread.
struct PodSide {
    ifname: String,
    addresses: Vec<Ipv4Addr>,
    gateway: Ipv4Addr,
}

impl PodSide {
    fn of(link: &PodLink) -> Self {
        PodSide {
            ifname: link.ifname.clone(),
            addresses: link.addresses.iter().map(|n| n.addr()).collect(),
            gateway: link.gateway,
        }
    }
}

/// Pod side, run on the pod netns worker: lo and ifname up, /32 addresses,
/// the gateway link route, then the default route. Returns ifname's MAC.
async fn wire_pod(h: Handle, pod: PodSide) -> Result<[u8; 6], DataplaneError> {
    let PodSide {
        ifname,
        addresses,
        gateway,
    } = pod;
    let dev = nl::link_by_name(&h, &ifname)
        .await?
        .ok_or_else(|| DataplaneError::Netlink {
            op: format!("get link {ifname} in the pod netns"),
            detail: "vanished right after it was created".into(),
        })?;
    let pod_mac = dev.mac.ok_or_else(|| DataplaneError::Netlink {
        op: format!("get link {ifname} in the pod netns"),
        detail: "it has no MAC address".into(),
    })?;
    futures::try_join!(
        nl::set_up(&h, LinkUnspec::new_with_name("lo").up().build(), "lo"),
        nl::set_up(
            &h,
            LinkUnspec::new_with_index(dev.index).up().build(),
            &ifname
        ),
    )?;
    try_join_all(
        addresses
            .iter()
            .map(|ip| nl::add_address(&h, dev.index, *ip, &ifname)),
    )
    .await?;
    // The gateway must be reachable on-link before the default route via it.
    // Its permanent neighbour entry means the pod never ARPs for it: proxy
    // ARP only answers where the node routes the gateway elsewhere, which a
    // node without a default route does not (calico#3270).
    let gw_route = nl::route(gateway, 32, dev.index, None, RouteScope::Link);
    let gw_route_text = format!("{gateway} dev {ifname}");
    futures::try_join!(
        nl::add_route(&h, gw_route, false, &gw_route_text),
        nl::add_permanent_neighbour(&h, dev.index, gateway, HOST_VETH_MAC, &ifname),
    )?;
    let default = nl::route(
        Ipv4Addr::UNSPECIFIED,
        0,
        dev.index,
        Some(gateway),
        RouteScope::Universe,
    );
    nl::add_route(
        &h,
        default,
        false,
        &format!("default via {gateway} dev {ifname}"),
    )
    .await?;
    Ok(pod_mac)
}

async fn teardown(host_veth: &str) -> Result<(), DataplaneError> {
    let host = nl::connect()?;
    if !nl::delete_link_by_name(&host, host_veth).await? {
        debug!(host_veth, "host veth already gone");
    }
    Ok(())
}

async fn check(link: &PodLink) -> Result<(), DataplaneError> {
    let netns = open_netns(&link.netns)?;
    let host = nl::connect()?;
    let mut pod = PodNetns::start(netns, &link.netns)?;
    let expected: Vec<Ipv4Addr> = link.addresses.iter().map(|n| n.addr()).collect();
    let ifname = link.ifname.clone();
    let gateway = link.gateway;
    let pod_expected = expected.clone();
    let (host_problems, pod_problems) = tokio::join!(
        check_host(&host, &link.host_veth, &expected),
        pod.run(move |h| async move { check_pod(&h, &ifname, &pod_expected, gateway).await }),
    );
    let mut problems = host_problems?;
    problems.extend(pod_problems?);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::Mismatch(problems.join("; ")))
    }
}

async fn check_host(
    host: &Handle,
    name: &str,
    expected: &[Ipv4Addr],
) -> Result<Vec<String>, DataplaneError> {
    let mut problems = Vec::new();
    let Some(veth) = nl::link_by_name(host, name).await? else {
        problems.push(format!("host veth {name} is missing"));
        return Ok(problems);
    };
    if !veth.up {
        problems.push(format!("host veth {name} is down"));
    }
    let path = format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp");
    let proxy_arp =
        std::fs::read_to_string(&path).map_err(|source| DataplaneError::Sysctl { path, source })?;
    if proxy_arp.trim() != "1" {
        problems.push(format!("proxy_arp on {name} is {}", proxy_arp.trim()));
    }
    for ip in expected {
        if !routed_via(host, *ip, veth.index).await? {
            problems.push(format!("host route {ip}/32 dev {name} is missing"));
        }
    }
    Ok(problems)
}

async fn check_pod(
    h: &Handle,
    ifname: &str,
    expected: &[Ipv4Addr],
    gateway: Ipv4Addr,
) -> Result<Vec<String>, DataplaneError> {
    let mut problems = Vec::new();
    let Some(dev) = nl::link_by_name(h, ifname).await? else {
        problems.push(format!("{ifname} is missing in the pod netns"));
        return Ok(problems);
    };
    if !dev.up {
        problems.push(format!("{ifname} is down in the pod netns"));
    }
    let mut want: Vec<(Ipv4Addr, u8)> = expected.iter().map(|ip| (*ip, 32)).collect();
    want.sort();
    let have = nl::addresses(h, dev.index).await?;
    if have != want {
        problems.push(format!(
            "addresses on {ifname} are [{}], expected [{}]",
            show_addresses(&have),
            show_addresses(&want)
        ));
    }
    let routes = nl::main_routes(h).await?;
    let on_dev = |r: &&nl::Route| r.oif == Some(dev.index);
    if !routes.iter().filter(on_dev).any(|r| {
        r.len == 32 && r.dst == gateway && r.gateway.is_none() && r.scope == RouteScope::Link
    }) {
        problems.push(format!(
            "route {gateway} dev {ifname} scope link is missing"
        ));
    }
    if !routes
        .iter()
        .filter(on_dev)
        .any(|r| r.len == 0 && r.gateway == Some(gateway))
    {
        problems.push(format!(
            "default route via {gateway} dev {ifname} is missing"
        ));
    }
    match nl::neighbour(h, dev.index, gateway).await? {
        Some((NeighbourState::Permanent, Some(HOST_VETH_MAC))) => {}
        Some((state, mac)) => problems.push(format!(
            "neighbour {gateway} on {ifname} is {state:?} lladdr {}, expected PERMANENT lladdr {}",
            mac.as_ref().map_or("none".into(), nl::show_mac),
            nl::show_mac(&HOST_VETH_MAC)
        )),
        None => problems.push(format!(
            "permanent neighbour {gateway} lladdr {} on {ifname} is missing",
            nl::show_mac(&HOST_VETH_MAC)
        )),
    }
    Ok(problems)
}

fn show_addresses(list: &[(Ipv4Addr, u8)]) -> String {
    list.iter()
        .map(|(ip, len)| format!("{ip}/{len}"))
        .collect::<Vec<_>>()
        .join(", ")
}
