//! The ferry end-to-end test harness.
//!
//! Every privileged test builds its own little world and tears it down again,
//! even when it fails (all guards clean up in `Drop`):
//!
//! * [`Fabric`]: a network namespace holding a bridge, the "underlay" switch.
//! * [`Node`]: a network namespace wired to the fabric by a veth, with a node IP
//!   (192.168.77.x/24) that exists only inside our namespaces, plus a temp dir.
//! * [`Ipamd`]: the real `ipamd` binary, run with `ip netns exec <node>`, its
//!   socket and state in the node's temp dir; killed by PID on drop.
//! * [`Pod`]: a network namespace plus a container ID and interface name.
//! * [`Cni`]: runs a CNI plugin binary inside the node netns exactly as a
//!   runtime does (CNI_* environment, network config on stdin), and
//!   [`Runtime`] runs a whole conflist libcni-style (chaining, prevResult,
//!   runtimeConfig by capabilities, cached ADD result for DEL/CHECK).
//! * [`OneNode`]: fabric, node, ipamd, runtime and a ferry conflist in one.
//! * [`containerd::Containerd`]: a private containerd in a node's namespace,
//!   running busybox containers networked by a conflist's plugins.
//!
//! Nothing here touches the root network namespace: no links, addresses,
//! routes, sysctls or firewall rules are created there. Processes are only
//! ever killed by the PID we got when we spawned them.
//!
//! Typical use:
//!
//! ```no_run
//! use ferry_tests::*;
//! # fn main() -> anyhow::Result<()> {
//! require_root();
//! let fabric = Fabric::new()?;
//! let node = fabric.add_node()?;
//! let ipamd = Ipamd::start(&node, IpamdConfig::default())?;
//! let cni = Cni::new(&node);
//! let pod = Pod::new()?;
//! let conf = ferry_netconf(ipamd.socket(), "1.1.0");
//! let out = cni.ferry(&CniCall::add(&pod), &conf)?;
//! assert!(out.success(), "{out}");
//! let ip = out.ips()[0];
//! assert!(pod.ns.ping(&ip.to_string()));
//! # Ok(()) }
//! ```

mod cni;
pub mod containerd;
mod ipamd;
mod netns;
pub mod storm;
mod util;
mod world;

pub use cni::{
    Cni, CniCall, CniOutput, Runtime, conflist, ferry_netconf, ferry_plugin_conf, k8s_args,
    result_ips, version_at_least,
};
pub use ipamd::{
    Ipamd, IpamdConfig, allocation_of, block_cidrs, ipamctl, ipamctl_allocations, ipamctl_blocks,
    ipamctl_json,
};
pub use netns::{FABRIC_PREFIX, Fabric, Netns, Node, Pod};
pub use util::{
    ChildGuard, Poll, bin, bin_dir, cni_plugin_dir, is_root, poll, random_container_id,
    require_root, tail, unique, wait_until, workspace_root,
};
pub use world::OneNode;

/// How long ipamd may take to delete host veths after the DELs that handed
/// them over (it deletes them in the background).
pub const DEL_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod selftest {
    use super::*;

    /// The world without ferry: two nodes on one fabric reach each other, and
    /// everything is gone after the guards drop.
    #[test]
    fn fabric_nodes_ping_and_clean_up() {
        require_root();
        let names;
        {
            let fabric = Fabric::new().unwrap();
            let a = fabric.add_node().unwrap();
            let b = fabric.add_node().unwrap();
            assert!(a.ns.ping(&b.ip.to_string()), "node a cannot reach node b");
            assert_eq!(a.ns.ipv4_addrs("eth0").unwrap(), vec![a.ip]);
            assert!(a.ns.ferry_links().unwrap().is_empty());
            names = [
                fabric.ns.name().to_string(),
                a.ns.name().to_string(),
                b.ns.name().to_string(),
            ];
        }
        let listed = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        for n in names {
            assert!(
                !listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(n.as_str())),
                "{n} left behind"
            );
        }
    }

    #[test]
    fn libcni_netconf_injection() {
        let list = conflist(
            "1.1.0",
            "net",
            vec![
                serde_json::json!({"type": "ferry"}),
                serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}),
            ],
        );
        let rc = serde_json::json!({"portMappings": [{"hostPort": 1}], "bandwidth": {"x": 1}, "ips": ["1.2.3.4"]});
        let prev = serde_json::json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.1/32"}]});
        let first = Runtime::plugin_netconf(&list, 0, None, &rc).unwrap();
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.1.0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none());
        let second = Runtime::plugin_netconf(&list, 1, Some(&prev), &rc).unwrap();
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            serde_json::json!({"portMappings": [{"hostPort": 1}]})
        );
        assert_eq!(
            result_ips(&prev),
            vec!["10.0.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
    }
}
