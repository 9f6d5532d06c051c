//! Privileged tests against the real kernel. Every test makes its own uniquely
//! named namespaces, drives the dataplane from a thread that entered the node
//! netns (the test process itself never leaves the root netns), and removes
//! the namespaces in Drop guards.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::Ipv4Net;
use nix::sched::{CloneFlags, setns};

use super::LinuxDataplane;
use crate::dataplane::{Dataplane, DataplaneError, PodLink};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Panics unless we are root: a test that cannot make its namespaces must
/// fail, not pass having tested nothing.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this dataplane test needs root (it creates network namespaces): run cargo test -p ferry as root"
    );
}

/// A named netns (`ip netns add`), deleted on drop even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args...`, which must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command inside this netns; returns whether it succeeded.
    fn exec_ok(&self, cmd: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn read(&self, file: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat", file])
            .output()
            .expect("run cat");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `f` on a fresh thread that entered this netns.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).expect("open node netns");
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into node netns");
                f()
            })
            .join()
            .expect("node netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node netns shaped like a real node: an uplink with an address and a
/// default route (proxy ARP answers only for destinations routed out another
/// device), plus `pods` pod namespaces.
struct World {
    node: Netns,
    pods: Vec<Netns>,
}

impl World {
    fn new(pods: usize) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("fyd-{}-{n}", std::process::id());
        let node = Netns::new(format!("{base}-node"));
        // A veth pair stands in for the uplink (no dummy module everywhere).
        node.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        node.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        node.ip(&["link", "set", "up1", "up"]);
        node.ip(&["link", "set", "up0", "up"]);
        node.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "up0",
        ]);
        let pods = (0..pods)
            .map(|i| Netns::new(format!("{base}-pod{i}")))
            .collect();
        World { node, pods }
    }

    /// A node with no uplink and no default route, only `lo` (holding the
    /// node's /32, as on a BGP-routed node) and the pods.
    fn without_default_route(pods: usize) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("fyd-{}-{n}", std::process::id());
        let node = Netns::new(format!("{base}-node"));
        node.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
        let pods = (0..pods)
            .map(|i| Netns::new(format!("{base}-pod{i}")))
            .collect();
        World { node, pods }
    }

    fn link(&self, pod: usize, ip: &str) -> PodLink {
        PodLink {
            netns: self.pods[pod].path(),
            ifname: "eth0".into(),
            host_veth: format!("fry0test{pod:04}"),
            addresses: vec![Ipv4Net::new(ip.parse().expect("ip"), 32).expect("net")],
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            mtu: 1480,
            replace_stale: false,
        }
    }

    fn host_has(&self, name: &str) -> bool {
        let out = self.node.ip(&["-o", "link", "show"]);
        out.contains(&format!(": {name}@")) || out.contains(&format!(": {name}:"))
    }
}

/// Whether one line of `text` starts with `parts[0]` and holds the rest.
fn has_line(text: &str, parts: &[&str]) -> bool {
    text.lines()
        .any(|l| l.starts_with(parts[0]) && parts[1..].iter().all(|p| l.contains(p)))
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn setup_wires_both_sides() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.2");
    let dp = LinuxDataplane::new();
    let attached = w.node.enter(|| dp.setup(&link)).expect("setup");
    let pod = &w.pods[0];

    let addr = pod.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.244.0.2/32"), "{addr}");
    let routes = pod.ip(&["-4", "route", "show"]);
    assert!(
        has_line(&routes, &["default via 169.254.1.1 dev eth0"]),
        "{routes}"
    );
    assert!(
        has_line(&routes, &["169.254.1.1 dev eth0", "scope link"]),
        "{routes}"
    );
    let eth0 = pod.ip(&["link", "show", "eth0"]);
    assert!(eth0.contains("state UP") || eth0.contains(",UP"), "{eth0}");
    assert!(eth0.contains("mtu 1480"), "{eth0}");
    assert!(
        eth0.contains(&mac(attached.pod_mac)),
        "{eth0} vs {:?}",
        attached.pod_mac
    );
    let lo = pod.ip(&["link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let neigh = pod.ip(&["-4", "neigh", "show", "dev", "eth0"]);
    assert!(
        has_line(
            &neigh,
            &["169.254.1.1 lladdr ee:ee:ee:ee:ee:ee", "PERMANENT"]
        ),
        "{neigh}"
    );

    let host = w.node.ip(&["link", "show", &link.host_veth]);
    assert!(host.contains("ee:ee:ee:ee:ee:ee"), "{host}");
    assert!(host.contains("mtu 1480"), "{host}");
    assert!(host.contains(",UP"), "{host}");
    assert_eq!(attached.host_mac, [0xee; 6]);
    let node_routes = w.node.ip(&["-4", "route", "show"]);
    let host_route = format!("10.244.0.2 dev {}", link.host_veth);
    assert!(
        has_line(&node_routes, &[&host_route, "scope link"]),
        "{node_routes}"
    );
    let conf = format!("/proc/sys/net/ipv4/conf/{}", link.host_veth);
    assert_eq!(w.node.read(&format!("{conf}/proxy_arp")), "1");
    assert_eq!(w.node.read(&format!("{conf}/forwarding")), "1");
    assert_eq!(
        w.node.read(&format!(
            "/proc/sys/net/ipv4/neigh/{}/proxy_delay",
            link.host_veth
        )),
        "0"
    );

    w.node.enter(|| dp.check(&link)).expect("check after setup");
}

#[test]
fn two_pods_ping_each_other_through_the_node() {
    require_root();
    let w = World::new(2);
    let a = w.link(0, "10.244.0.2");
    let b = w.link(1, "10.244.0.3");
    let dp = LinuxDataplane::new();
    w.node.enter(|| dp.setup(&a)).expect("setup a");
    // The second one from inside a tokio runtime, as an async caller would.
    w.node
        .enter(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(async { dp.setup(&b) })
        })
        .expect("setup b");
    assert!(
        w.pods[0].exec_ok(&["ping", "-c1", "-W1", "10.244.0.3"]),
        "pod0 cannot reach pod1"
    );
    assert!(
        w.pods[1].exec_ok(&["ping", "-c1", "-W1", "10.244.0.2"]),
        "pod1 cannot reach pod0"
    );
}

/// The gateway does not depend on the node's routes: with no default route
/// the host veth's proxy ARP stays silent, so only the pod's permanent
/// neighbour entry for the gateway gets the first packet out.
#[test]
fn pods_reach_each_other_on_a_node_without_a_default_route() {
    require_root();
    let w = World::without_default_route(3);
    let ips = ["10.244.0.2", "10.244.0.3", "10.244.0.4"];
    let dp = LinuxDataplane::new();
    for (i, ip) in ips.iter().enumerate() {
        w.node.enter(|| dp.setup(&w.link(i, ip))).expect("setup");
        // The very first packet of a fresh pod, with nothing learnt yet.
        let first = if i == 0 { "192.0.2.1" } else { ips[0] };
        assert!(
            w.pods[i].exec_ok(&["ping", "-c1", "-W1", first]),
            "pod{i}'s first ping to {first} failed"
        );
    }
    for (i, pod) in w.pods.iter().enumerate() {
        for (j, ip) in ips.iter().enumerate() {
            if i != j {
                assert!(pod.exec_ok(&["ping", "-c1", "-W1", ip]), "pod{i} -> {ip}");
            }
        }
    }
    for ip in ips {
        assert!(w.node.exec_ok(&["ping", "-c1", "-W1", ip]), "node -> {ip}");
    }
}

#[test]
fn stale_host_veth_is_replaced() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.4");
    // Left over from an earlier ADD whose pod netns is long gone.
    w.node.ip(&[
        "link",
        "add",
        &link.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "oldpeer",
    ]);
    let dp = LinuxDataplane::new();
    w.node
        .enter(|| dp.setup(&link))
        .expect("setup over stale veth");
    assert!(!w.host_has("oldpeer"), "stale peer should be gone");
    assert!(w.host_has(&link.host_veth));
    w.node.enter(|| dp.check(&link)).expect("check");
}

#[test]
fn a_released_attachments_live_pair_is_replaced_only_for_a_fresh_address() {
    require_root();
    let w = World::new(1);
    let dp = LinuxDataplane::new();
    let old = w.link(0, "10.244.0.20");
    w.node.enter(|| dp.setup(&old)).expect("first setup");
    // DEL released the address; its veth pair is still there (deleted in the
    // background). A retried ADD holding the same address is a live pod.
    let retried = w.node.enter(|| dp.setup(&old));
    assert!(
        matches!(
            retried,
            Err(DataplaneError::InterfaceExists { attached: true, .. })
        ),
        "{retried:?}"
    );
    let fresh = PodLink {
        addresses: vec![Ipv4Net::new("10.244.0.21".parse().expect("ip"), 32).expect("net")],
        replace_stale: true,
        ..old.clone()
    };
    w.node
        .enter(|| dp.setup(&fresh))
        .expect("setup over the stale pair");
    w.node.enter(|| dp.check(&fresh)).expect("check");
    let routes = w.node.ip(&["-4", "route", "show"]);
    assert!(!routes.contains("10.244.0.20"), "{routes}");
}

#[test]
fn a_pair_routing_another_lease_is_replaced_when_the_created_flag_was_lost() {
    require_root();
    let w = World::new(1);
    let dp = LinuxDataplane::new();
    let old = w.link(0, "10.244.0.25");
    w.node.enter(|| dp.setup(&old)).expect("first setup");
    // ipamd died after committing the new lease but before its reply, so
    // the retried ADD sees the lease as not created.
    let retried_after_crash = PodLink {
        addresses: vec![Ipv4Net::new("10.244.0.26".parse().expect("ip"), 32).expect("net")],
        replace_stale: false,
        ..old.clone()
    };
    w.node
        .enter(|| dp.setup(&retried_after_crash))
        .expect("setup over the earlier lease's pair");
    w.node
        .enter(|| dp.check(&retried_after_crash))
        .expect("check");
    let routes = w.node.ip(&["-4", "route", "show"]);
    assert!(!routes.contains("10.244.0.25"), "{routes}");
}

#[test]
fn add_waits_for_another_attachments_departing_pair() {
    require_root();
    let w = World::new(1);
    let dp = LinuxDataplane::new();
    let old = w.link(0, "10.244.0.30");
    w.node.enter(|| dp.setup(&old)).expect("first setup");
    // A new container's ADD into the same netns while the old pair is still
    // queued for deletion in ipamd (here: deleted from another thread).
    let new = PodLink {
        host_veth: "fry0testnew01".into(),
        addresses: vec![Ipv4Net::new("10.244.0.31".parse().expect("ip"), 32).expect("net")],
        ..old.clone()
    };
    let node = &w.node;
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            node.ip(&["link", "del", &old.host_veth]);
        });
        node.enter(|| dp.setup(&new))
            .expect("setup after the old pair left");
    });
    w.node.enter(|| dp.check(&new)).expect("check");
}

#[test]
fn existing_pod_interface_is_an_error_and_left_alone() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.5");
    w.pods[0].ip(&["link", "add", "eth0", "type", "bridge"]);
    let dp = LinuxDataplane::new();
    let err = w.node.enter(|| dp.setup(&link)).expect_err("must fail");
    assert!(
        matches!(err, DataplaneError::InterfaceExists { ref ifname, attached: false, .. } if ifname == "eth0"),
        "{err:?}"
    );
    let eth0 = w.pods[0].ip(&["-d", "link", "show", "eth0"]);
    assert!(eth0.contains("bridge"), "{eth0}");
    assert!(!w.host_has(&link.host_veth));
}

#[test]
fn repeated_setup_of_a_live_attachment_leaves_it_intact() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.6");
    let dp = LinuxDataplane::new();
    let first = w.node.enter(|| dp.setup(&link)).expect("setup");
    let err = w.node.enter(|| dp.setup(&link)).expect_err("must fail");
    assert!(
        matches!(err, DataplaneError::InterfaceExists { attached: true, .. }),
        "{err:?}"
    );
    // Still the same wire: same pod MAC, still addressed, host end still there.
    let eth0 = w.pods[0].ip(&["link", "show", "eth0"]);
    let mac = first
        .pod_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(eth0.contains(&mac), "pod MAC changed: {eth0} vs {mac}");
    assert!(w.host_has(&link.host_veth));
    w.node.enter(|| dp.check(&link)).expect("check");
}

#[test]
fn missing_netns_is_reported() {
    require_root();
    let w = World::new(0);
    let mut link = w.link_without_pod("10.244.0.6");
    link.netns = PathBuf::from("/run/netns/fyd-does-not-exist");
    let dp = LinuxDataplane::new();
    let err = w.node.enter(|| dp.setup(&link)).expect_err("must fail");
    assert!(
        matches!(err, DataplaneError::NetnsMissing { .. }),
        "{err:?}"
    );
    assert!(!w.host_has(&link.host_veth));
}

impl World {
    fn link_without_pod(&self, ip: &str) -> PodLink {
        PodLink {
            netns: PathBuf::new(),
            ifname: "eth0".into(),
            host_veth: "fry0testnone".into(),
            addresses: vec![Ipv4Net::new(ip.parse().expect("ip"), 32).expect("net")],
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            mtu: 0,
            replace_stale: false,
        }
    }
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    require_root();
    let w = World::new(1);
    let mut link = w.link(0, "10.244.0.7");
    // The same address twice: the second add fails after the veth exists.
    link.addresses.push(link.addresses[0]);
    let dp = LinuxDataplane::new();
    let err = w.node.enter(|| dp.setup(&link)).expect_err("must fail");
    assert!(matches!(err, DataplaneError::Netlink { .. }), "{err:?}");
    assert!(!w.host_has(&link.host_veth), "host veth left behind");
    let pod_links = w.pods[0].ip(&["-o", "link", "show"]);
    assert!(!pod_links.contains("eth0"), "{pod_links}");
    let node_routes = w.node.ip(&["-4", "route", "show"]);
    assert!(!node_routes.contains("10.244.0.7"), "{node_routes}");
}

#[test]
fn teardown_twice_is_ok() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.8");
    let dp = LinuxDataplane::new();
    w.node.enter(|| dp.setup(&link)).expect("setup");
    for round in 0..2 {
        w.node
            .enter(|| dp.teardown(&link.host_veth))
            .unwrap_or_else(|e| panic!("teardown round {round}: {e}"));
    }
    assert!(!w.host_has(&link.host_veth));
    let pod_links = w.pods[0].ip(&["-o", "link", "show"]);
    assert!(!pod_links.contains("eth0"), "{pod_links}");
    let node_routes = w.node.ip(&["-4", "route", "show"]);
    assert!(!node_routes.contains("10.244.0.8"), "{node_routes}");
}

#[test]
fn host_link_index_finds_the_host_veth_until_it_is_gone() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.9");
    let dp = LinuxDataplane::new();
    w.node.enter(|| dp.setup(&link)).expect("setup");
    let index = w
        .node
        .enter(|| dp.host_link_index(&link.host_veth))
        .expect("lookup")
        .expect("the host veth exists");
    let shown = w.node.ip(&["-o", "link", "show", &link.host_veth]);
    assert!(
        shown.starts_with(&format!("{index}: ")),
        "{index} vs {shown}"
    );
    w.node
        .enter(|| dp.teardown(&link.host_veth))
        .expect("teardown");
    let gone = w.node.enter(|| dp.host_link_index(&link.host_veth));
    assert_eq!(gone.expect("lookup"), None);
}

#[test]
fn teardown_with_netns_gone_or_absent_is_ok() {
    require_root();
    let w = World::new(2);
    let dp = LinuxDataplane::new();

    // Pod netns deleted under us: the kernel took both veth ends with it.
    let a = w.link(0, "10.244.0.9");
    w.node.enter(|| dp.setup(&a)).expect("setup a");
    run("ip", &["netns", "del", &w.pods[0].name]);
    w.node
        .enter(|| dp.teardown(&a.host_veth))
        .expect("teardown with netns gone");

    // The host side alone goes, and the peer with it.
    let b = w.link(1, "10.244.0.10");
    w.node.enter(|| dp.setup(&b)).expect("setup b");
    w.node
        .enter(|| dp.teardown(&b.host_veth))
        .expect("teardown of b");
    assert!(!w.host_has(&b.host_veth));
    let pod_links = w.pods[1].ip(&["-o", "link", "show"]);
    assert!(!pod_links.contains("eth0"), "{pod_links}");

    // Nothing at all left: still fine.
    w.node
        .enter(|| dp.teardown("fry0testgone"))
        .expect("teardown of nothing");
}

#[test]
fn teardown_leaves_a_pod_interface_without_our_host_end_alone() {
    require_root();
    let w = World::new(1);
    let dp = LinuxDataplane::new();
    // Someone else's veth pair inside the pod, named like ours would be.
    w.pods[0].ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ]);
    let link = w.link(0, "10.244.0.11");
    w.node
        .enter(|| dp.teardown(&link.host_veth))
        .expect("teardown");
    let links = w.pods[0].ip(&["-o", "link", "show"]);
    assert!(links.contains("eth0") && links.contains("other"), "{links}");
}

#[test]
fn check_detects_drift() {
    require_root();
    let w = World::new(1);
    let link = w.link(0, "10.244.0.11");
    let dp = LinuxDataplane::new();
    w.node.enter(|| dp.setup(&link)).expect("setup");
    w.node.enter(|| dp.check(&link)).expect("clean check");

    w.pods[0].ip(&["route", "del", "default"]);
    let err = w
        .node
        .enter(|| dp.check(&link))
        .expect_err("default route gone");
    assert!(
        matches!(err, DataplaneError::Mismatch(ref m) if m.contains("default route")),
        "{err:?}"
    );

    w.pods[0].ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    w.node.enter(|| dp.check(&link)).expect("repaired");

    w.pods[0].ip(&["neigh", "del", "169.254.1.1", "dev", "eth0"]);
    let err = w
        .node
        .enter(|| dp.check(&link))
        .expect_err("gateway neighbour gone");
    assert!(
        matches!(err, DataplaneError::Mismatch(ref m) if m.contains("neighbour 169.254.1.1")),
        "{err:?}"
    );
    w.pods[0].ip(&[
        "neigh",
        "replace",
        "169.254.1.1",
        "lladdr",
        "ee:ee:ee:ee:ee:ee",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    w.node
        .enter(|| dp.check(&link))
        .expect("neighbour repaired");

    w.node.ip(&["route", "del", "10.244.0.11/32"]);
    let err = w
        .node
        .enter(|| dp.check(&link))
        .expect_err("host route gone");
    assert!(
        matches!(err, DataplaneError::Mismatch(ref m) if m.contains("host route 10.244.0.11/32")),
        "{err:?}"
    );

    // An extra address in the pod is drift too.
    w.pods[0].ip(&["addr", "add", "10.244.0.99/32", "dev", "eth0"]);
    let err = w.node.enter(|| dp.check(&link)).expect_err("extra address");
    assert!(
        matches!(err, DataplaneError::Mismatch(ref m) if m.contains("10.244.0.99/32")),
        "{err:?}"
    );
}
