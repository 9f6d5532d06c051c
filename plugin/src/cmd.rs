//! ADD, DEL, CHECK, STATUS and GC over an IpamClient and a Dataplane:
//! pure orchestration, so every path is unit-tested with fakes.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tracing::{info, warn};

use crate::cni::config::{prev_result_addresses, prev_result_gateway};
use crate::cni::error::code;
use crate::cni::result::{AddResult, Wired};
use crate::cni::{Attachment, CniError, GcRequest, Request, StatusRequest, version};
use crate::dataplane::{Dataplane, PodLink};
use crate::ipam::grpc::GrpcIpam;
use crate::ipam::{IpamClient, IpamClientError, Key, Readiness};

/// Runs `req` against the real ipamd and kernel; returns what goes on stdout.
pub fn execute(req: &Request) -> Result<Option<String>, CniError> {
    let reply = match (req, req.conf()) {
        (Request::Version { requested }, _) => Some(version_json(requested.as_deref())?),
        (_, Some(conf)) => {
            let ipam = GrpcIpam::new(
                &conf.ipamd.socket,
                Duration::from_millis(conf.ipamd.timeout_ms),
            )
            .map_err(|e| CniError::new(code::IO, format!("cannot start the ipamd client: {e}")))?;
            let dataplane = crate::dataplane::linux::LinuxDataplane::new();
            run(req, &ipam, &dataplane)?
        }
        (_, None) => return Err(CniError::new(code::INTERNAL, "request without a config")),
    };
    Ok(reply.map(|v| v.to_string()))
}

/// Dispatches one verb; Some(json) is printed, None prints nothing.
pub fn run(
    req: &Request,
    ipam: &dyn IpamClient,
    dp: &dyn Dataplane,
) -> Result<Option<Value>, CniError> {
    match req {
        Request::Version { requested } => version_json(requested.as_deref()).map(Some),
        Request::Add(a) => add(a, ipam, dp).map(Some),
        Request::Del(a) => del(a, ipam, dp).map(|()| None),
        Request::Check(a) => check(a, ipam, dp).map(|()| None),
        Request::Status(s) => status(s, ipam).map(|()| None),
        Request::Gc(g) => gc(g, ipam, dp).map(|()| None),
    }
}

fn version_json(requested: Option<&str>) -> Result<Value, CniError> {
    serde_json::to_value(version::version_reply(requested)).map_err(|e| {
        CniError::new(
            code::INTERNAL,
            format!("cannot encode the VERSION reply: {e}"),
        )
    })
}

/// The netns ADD and CHECK work in: set and present, else 103; not the
/// node's own (the plugin's), else 4.
fn required_netns(a: &Attachment) -> Result<&Path, CniError> {
    let netns = a.netns.as_deref().ok_or_else(|| {
        CniError::new(
            code::NETNS,
            "CNI_NETNS is not set: the pod's network namespace path is required",
        )
    })?;
    crate::cni::netns::check_pod_netns(netns, Path::new(crate::cni::netns::NODE_NETNS))?;
    Ok(netns)
}

pub fn add(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<Value, CniError> {
    // Before Allocate: a bad netns must not cost an address.
    let netns = required_netns(a)?;
    let key = a.key();
    let lease = ipam.allocate(
        &key,
        &a.pod_info(),
        &a.requested_ips,
        a.pool_hint.as_deref(),
    )?;
    info!(container = %a.container_id, ifname = %a.ifname, pool = %lease.pool,
          addresses = ?lease.addresses, "allocated");

    let link = PodLink {
        netns: netns.to_path_buf(),
        ifname: a.ifname.clone(),
        host_veth: a.host_veth(),
        addresses: lease.addresses.clone(),
        gateway: lease.gateway,
        mtu: if a.conf.mtu != 0 {
            a.conf.mtu
        } else {
            lease.mtu
        },
        replace_stale: lease.created,
    };
    let attached = match dp.setup(&link) {
        Ok(attached) => attached,
        // A failed setup has already removed any pair it made, and a pair it
        // did not make (a live attachment whose retried ADD failed early) is
        // not ours to delete.
        Err(e) => {
            rollback(&key, &link, lease.created, false, ipam, dp);
            return Err(e.into());
        }
    };
    let rendered = AddResult::for_pod(&Wired {
        host_veth: &link.host_veth,
        host_mac: attached.host_mac,
        ifname: &link.ifname,
        pod_mac: attached.pod_mac,
        netns,
        addresses: &link.addresses,
        gateway: link.gateway,
    })
    .and_then(|r| r.render(a.version, a.conf.prev_result.as_ref()));
    match rendered {
        Ok(v) => {
            info!(container = %a.container_id, host_veth = %link.host_veth, "ADD done");
            Ok(v)
        }
        Err(e) => {
            rollback(&key, &link, lease.created, true, ipam, dp);
            Err(e)
        }
    }
}

/// Undoes what this ADD did, and only that: the pair if it made one, the
/// address if it allocated it (a retried ADD got back an address the pod
/// may still use; the runtime's DEL frees it). Errors are logged, never
/// returned: the caller reports the error that caused the rollback.
fn rollback(
    key: &Key,
    link: &PodLink,
    allocated: bool,
    made_pair: bool,
    ipam: &dyn IpamClient,
    dp: &dyn Dataplane,
) {
    warn!(container = %key.container_id, ifname = %key.ifname, allocated, made_pair,
        "ADD failed, rolling back");
    if made_pair && let Err(e) = dp.teardown(&link.host_veth) {
        warn!(error = %e, host_veth = %link.host_veth, "rollback: teardown failed");
    }
    if allocated && let Err(e) = ipam.release(key) {
        warn!(error = %e, container = %key.container_id, "rollback: release failed");
    }
}

pub fn del(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let host_veth = a.host_veth();
    let key = a.key();
    // The kernel's veth unregister (an RCU wait of ~16 ms) would dominate
    // DEL, so ipamd deletes the host veth once the release is durable, by
    // ifindex so that a veth re-created under the same name is never hit.
    // Only the host end matters, so an empty or vanished netns is fine.
    let index = dp.host_link_index(&host_veth).unwrap_or_else(|e| {
        warn!(error = %e, %host_veth, "cannot look up the host veth; DEL deletes it itself");
        None
    });
    let released = match index {
        Some(ifindex) => ipam.release_and_unplug(&key, &host_veth, ifindex),
        None => ipam.release(&key).map(|()| false),
    };
    if !matches!(released, Ok(true)) {
        dp.teardown(&host_veth)?;
    }
    match released {
        Ok(_) => {}
        // The pod is unplugged either way; ipamd's reconcile frees the
        // address once it can (a version skew is a rolling upgrade in flight).
        Err(IpamClientError::Unreachable(msg) | IpamClientError::VersionMismatch(msg)) => {
            warn!(container = %a.container_id, %msg,
                  "ipamd cannot release on DEL; its reconcile will free the address");
        }
        Err(e) => return Err(e.into()),
    }
    info!(container = %a.container_id, ifname = %a.ifname, "DEL done");
    Ok(())
}

pub fn check(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let netns = required_netns(a)?;
    let prev = a.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult in the network config",
        )
    })?;
    let mut expected = prev_result_addresses(prev, &a.ifname)
        .map_err(|e| CniError::new(code::DECODE, format!("cannot read prevResult: {e}")))?;
    expected.sort();
    if expected.is_empty() {
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!("prevResult holds no IPv4 address for {}", a.ifname),
        ));
    }
    let key = a.key();
    let mut held = ipam.check(&key)?.ok_or_else(|| {
        CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "ipamd holds no address for {}/{}/{}; prevResult has {}",
                key.network,
                key.container_id,
                key.ifname,
                show(&expected)
            ),
        )
    })?;
    held.sort();
    if held != expected {
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "prevResult has {} but ipamd holds {}",
                show(&expected),
                show(&held)
            ),
        ));
    }
    dp.check(&PodLink {
        netns: netns.to_path_buf(),
        ifname: a.ifname.clone(),
        host_veth: a.host_veth(),
        gateway: prev_result_gateway(prev, &expected).unwrap_or(ferry_proto::POD_GATEWAY),
        addresses: expected,
        // CHECK does not compare the MTU; 0 says "unknown".
        mtu: a.conf.mtu,
        replace_stale: false,
    })?;
    Ok(())
}

fn show(addrs: &[ipnet::Ipv4Net]) -> String {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!("[{}]", list.join(", "))
}

pub fn status(_req: &StatusRequest, ipam: &dyn IpamClient) -> Result<(), CniError> {
    match ipam.status() {
        Ok((Readiness::Ready, _)) => Ok(()),
        Ok((Readiness::NotAvailable, reason)) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("ipamd is not ready: {reason}"),
        )),
        Ok((Readiness::NoAddresses, reason)) => Err(CniError::new(
            code::NO_ADDRESSES,
            format!("no addresses to hand out: {reason}"),
        )),
        Err(e @ (IpamClientError::Unreachable(_) | IpamClientError::Unavailable(_))) => {
            Err(CniError::new(code::NOT_AVAILABLE, e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn gc(req: &GcRequest, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let network = &req.conf.name;
    let valid: Vec<Key> = req
        .valid
        .iter()
        .map(|v| Key {
            network: network.clone(),
            container_id: v.container_id.clone(),
            ifname: v.ifname.clone(),
        })
        .collect();
    let released = ipam.gc(network, &valid)?;
    for key in &released {
        let host_veth = ferry_proto::host_veth_name(&key.container_id, &key.ifname);
        match dp.teardown(&host_veth) {
            // One line per attachment, so the plugin log says what GC freed.
            Ok(()) => info!(container = %key.container_id, ifname = %key.ifname,
                %host_veth, "GC released attachment and removed its host veth"),
            Err(e) => {
                warn!(error = %e, container = %key.container_id, ifname = %key.ifname,
                    %host_veth, "GC released attachment; teardown of its host veth failed")
            }
        }
    }
    info!(network = %network, released = released.len(), "GC done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    use ipnet::Ipv4Net;
    use serde_json::json;

    use super::*;
    use crate::cni::config::ValidAttachment;
    use crate::cni::request::parse;
    use crate::dataplane::DataplaneError;
    use crate::dataplane::fake::{Call, FakeDataplane};
    use crate::ipam::{Lease, PodInfo};

    /// An in-memory ipamd: one address per key from 10.244.0.0/24.
    #[derive(Default)]
    struct FakeIpam {
        held: RefCell<HashMap<(String, String, String), Ipv4Net>>,
        next: RefCell<u8>,
        calls: RefCell<Vec<String>>,
        /// Makes every call fail with this (rebuilt each time).
        fail: Option<fn() -> IpamClientError>,
        readiness: Option<Readiness>,
        last_pod: RefCell<Option<PodInfo>>,
        /// What release_and_unplug answers: did ipamd take the veth over.
        unplugs: bool,
        /// Makes only Release fail.
        fail_release: bool,
    }

    fn k(key: &Key) -> (String, String, String) {
        (
            key.network.clone(),
            key.container_id.clone(),
            key.ifname.clone(),
        )
    }

    impl FakeIpam {
        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
        fn fail_or(&self, name: &str) -> Result<(), IpamClientError> {
            self.calls.borrow_mut().push(name.to_string());
            self.fail.map_or(Ok(()), |f| Err(f()))
        }
    }

    impl IpamClient for FakeIpam {
        fn allocate(
            &self,
            key: &Key,
            pod: &PodInfo,
            requested: &[Ipv4Addr],
            _pool_hint: Option<&str>,
        ) -> Result<Lease, IpamClientError> {
            self.fail_or("allocate")?;
            *self.last_pod.borrow_mut() = Some(pod.clone());
            let mut held = self.held.borrow_mut();
            let created = !held.contains_key(&k(key));
            let addr = *held.entry(k(key)).or_insert_with(|| {
                let ip = requested.first().copied().unwrap_or_else(|| {
                    let mut n = self.next.borrow_mut();
                    *n += 1;
                    Ipv4Addr::new(10, 244, 0, *n)
                });
                Ipv4Net::from(ip)
            });
            Ok(Lease {
                addresses: vec![addr],
                gateway: ferry_proto::POD_GATEWAY,
                mtu: 1480,
                pool: "default".into(),
                created,
            })
        }
        fn release(&self, key: &Key) -> Result<(), IpamClientError> {
            self.fail_or("release")?;
            if self.fail_release {
                return Err(IpamClientError::Unreachable("ipamd went away".into()));
            }
            self.held.borrow_mut().remove(&k(key));
            Ok(())
        }
        fn release_and_unplug(
            &self,
            key: &Key,
            _host_veth: &str,
            _ifindex: u32,
        ) -> Result<bool, IpamClientError> {
            self.fail_or("release+unplug")?;
            self.held.borrow_mut().remove(&k(key));
            Ok(self.unplugs)
        }
        fn check(&self, key: &Key) -> Result<Option<Vec<Ipv4Net>>, IpamClientError> {
            self.fail_or("check")?;
            Ok(self.held.borrow().get(&k(key)).map(|a| vec![*a]))
        }
        fn gc(&self, network: &str, valid: &[Key]) -> Result<Vec<Key>, IpamClientError> {
            self.fail_or("gc")?;
            let valid: Vec<_> = valid.iter().map(k).collect();
            let mut held = self.held.borrow_mut();
            let gone: Vec<_> = held
                .keys()
                .filter(|key| key.0 == network && !valid.contains(key))
                .cloned()
                .collect();
            for key in &gone {
                held.remove(key);
            }
            Ok(gone
                .into_iter()
                .map(|(network, container_id, ifname)| Key {
                    network,
                    container_id,
                    ifname,
                })
                .collect())
        }
        fn status(&self) -> Result<(Readiness, String), IpamClientError> {
            self.fail_or("status")?;
            Ok((self.readiness.unwrap_or(Readiness::Ready), "why".into()))
        }
    }

    /// Always exists on Linux and is not the test's own netns, so ADD gets
    /// past its netns checks; the fake dataplane never enters it.
    const NETNS: &str = "/proc/self/ns/uts";

    fn request(verb: &str, version: &str, netns: &str, extra: Value) -> Request {
        let mut conf = json!({"cniVersion": version, "name": "ferry", "type": "ferry"});
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let env: HashMap<&str, String> = [
            ("CNI_COMMAND", verb.to_string()),
            ("CNI_CONTAINERID", "ctr1".to_string()),
            ("CNI_NETNS", netns.to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1;K8S_POD_UID=uid1".into(),
            ),
        ]
        .into_iter()
        .collect();
        parse(|k| env.get(k).cloned(), conf.to_string().as_bytes()).unwrap()
    }

    fn attachment(req: Request) -> Attachment {
        match req {
            Request::Add(a) | Request::Del(a) | Request::Check(a) => a,
            _ => panic!("not an attachment"),
        }
    }

    fn add_req(version: &str) -> Attachment {
        attachment(request("ADD", version, NETNS, json!({})))
    }

    #[test]
    fn add_allocates_sets_up_and_reports() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        let a = add_req("1.0.0");
        let out = add(&a, &ipam, &dp).unwrap();

        let calls = dp.calls();
        let [Call::Setup(link)] = calls.as_slice() else {
            panic!("{calls:?}")
        };
        assert_eq!(link.host_veth, ferry_proto::host_veth_name("ctr1", "eth0"));
        assert_eq!(link.netns, PathBuf::from(NETNS));
        assert_eq!(link.mtu, 1480, "mtu 0 in config = the lease's");
        assert_eq!(
            link.addresses,
            vec!["10.244.0.1/32".parse::<Ipv4Net>().unwrap()]
        );

        let pod = ipam.last_pod.borrow().clone().unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("ns1", "pod1"));
        assert_eq!(pod.netns, NETNS);

        assert_eq!(out["ips"][0]["address"], "10.244.0.1/32");
        assert_eq!(out["ips"][0]["interface"], 1);
        assert_eq!(out["interfaces"][1]["sandbox"], NETNS);
        assert!(out["ips"][0].get("version").is_none());
    }

    #[test]
    fn add_for_0_3_1_carries_ip_version() {
        let out = add(
            &add_req("0.3.1"),
            &FakeIpam::default(),
            &FakeDataplane::new(),
        )
        .unwrap();
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["ips"][0]["version"], "4");
    }

    #[test]
    fn config_mtu_beats_the_lease() {
        let a = attachment(request("ADD", "1.0.0", NETNS, json!({"mtu": 1400})));
        let dp = FakeDataplane::new();
        add(&a, &FakeIpam::default(), &dp).unwrap();
        let calls = dp.calls();
        let Some(Call::Setup(link)) = calls.first() else {
            panic!()
        };
        assert_eq!(link.mtu, 1400);
    }

    #[test]
    fn add_without_netns_is_103_and_allocates_nothing() {
        let ipam = FakeIpam::default();
        for netns in ["", "/nonexistent/netns/p1"] {
            let a = attachment(request("ADD", "1.0.0", netns, json!({})));
            let e = add(&a, &ipam, &FakeDataplane::new()).unwrap_err();
            assert_eq!(e.code, 103);
            if !netns.is_empty() {
                assert!(e.msg.contains(netns), "{}", e.msg);
            }
        }
        assert!(ipam.calls().is_empty());
    }

    #[test]
    fn add_and_check_in_the_node_netns_are_4_and_allocate_nothing() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        let a = attachment(request("ADD", "1.0.0", "/proc/self/ns/net", json!({})));
        let e = add(&a, &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 4, "{e:?}");
        let c = check_req("1.0.0", json!({"ips":[{"address":"10.244.0.1/32"}]}));
        let c = Attachment {
            netns: Some(PathBuf::from("/proc/self/ns/net")),
            ..c
        };
        assert_eq!(check(&c, &ipam, &dp).unwrap_err().code, 4);
        assert!(ipam.calls().is_empty());
        assert!(dp.calls().is_empty());
    }

    #[test]
    fn setup_failure_releases_the_new_address() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane {
            fail_setup: Some(Box::new(|| DataplaneError::Netlink {
                op: "add route".into(),
                detail: "EEXIST".into(),
            })),
            ..FakeDataplane::new()
        };
        let e = add(&add_req("1.0.0"), &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 105, "the original error, not a rollback one");
        assert_eq!(ipam.calls(), ["allocate", "release"]);
        assert!(ipam.held.borrow().is_empty());
        // A failed setup removes the pair it made itself.
        assert!(matches!(dp.calls().as_slice(), [Call::Setup(_)]));
    }

    #[test]
    fn rollback_errors_do_not_mask_the_cause() {
        let ipam = FakeIpam {
            fail_release: true,
            ..FakeIpam::default()
        };
        let dp = FakeDataplane {
            fail_setup: Some(Box::new(|| DataplaneError::Netlink {
                op: "x".into(),
                detail: "y".into(),
            })),
            ..FakeDataplane::new()
        };
        let e = add(&add_req("1.0.0"), &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 105);
        assert!(e.msg.starts_with("x:"), "{}", e.msg);
        assert_eq!(ipam.calls(), ["allocate", "release"]);
    }

    /// A retried ADD of a live pod that fails early (here: its netns cannot
    /// be entered) must leave the pod's pair and address alone.
    #[test]
    fn a_failed_retried_add_undoes_nothing_it_did_not_do() {
        let ipam = FakeIpam::default();
        add(&add_req("1.0.0"), &ipam, &FakeDataplane::new()).unwrap();
        let held = ipam.held.borrow().clone();
        let dp = FakeDataplane {
            fail_setup: Some(Box::new(|| DataplaneError::Netns {
                path: PathBuf::from(NETNS),
                source: std::io::Error::from_raw_os_error(libc::EMFILE),
            })),
            ..FakeDataplane::new()
        };
        let e = add(&add_req("1.0.0"), &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 103, "{e:?}");
        assert_eq!(
            ipam.calls(),
            ["allocate", "allocate"],
            "released a live pod's address"
        );
        assert_eq!(*ipam.held.borrow(), held);
        assert_eq!(dp.teardowns(), 0, "deleted a live pod's veth");
    }

    #[test]
    fn existing_interface_is_104_releases_but_tears_nothing_down() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane {
            fail_setup: Some(Box::new(|| DataplaneError::InterfaceExists {
                ifname: "eth0".into(),
                netns: PathBuf::from(NETNS),
                attached: false,
            })),
            ..FakeDataplane::new()
        };
        let e = add(&add_req("1.0.0"), &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 104);
        assert_eq!(dp.teardowns(), 0);
        assert_eq!(ipam.calls(), ["allocate", "release"]);
    }

    #[test]
    fn repeated_add_of_a_live_attachment_is_104_and_keeps_its_address() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        add(&add_req("1.0.0"), &ipam, &dp).unwrap();
        let again = FakeDataplane {
            fail_setup: Some(Box::new(|| DataplaneError::InterfaceExists {
                ifname: "eth0".into(),
                netns: PathBuf::from(NETNS),
                attached: true,
            })),
            ..FakeDataplane::new()
        };
        let e = add(&add_req("1.0.0"), &ipam, &again).unwrap_err();
        assert_eq!(e.code, 104);
        assert_eq!(again.teardowns(), 0);
        assert_eq!(ipam.calls(), ["allocate", "allocate"]);
        assert_eq!(ipam.held.borrow().len(), 1, "the live pod lost its address");
    }

    #[test]
    fn ipam_errors_on_add_keep_their_codes() {
        let cases: [(fn() -> IpamClientError, u32); 4] = [
            (
                || IpamClientError::Exhausted("pool default 10.244.0.0/16 full".into()),
                100,
            ),
            (
                || IpamClientError::Unreachable("ipamd is not reachable at /s".into()),
                11,
            ),
            (
                || IpamClientError::VersionMismatch("0.1 vs 0.2".into()),
                102,
            ),
            (
                || IpamClientError::AddressUnavailable("10.0.0.1 taken".into()),
                101,
            ),
        ];
        for (fail, want) in cases {
            let ipam = FakeIpam {
                fail: Some(fail),
                ..FakeIpam::default()
            };
            let dp = FakeDataplane::new();
            let e = add(&add_req("1.0.0"), &ipam, &dp).unwrap_err();
            assert_eq!(e.code, want);
            assert!(
                dp.calls().is_empty(),
                "nothing to undo before Allocate succeeds"
            );
        }
    }

    #[test]
    fn del_tears_down_then_releases_and_is_idempotent() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        add(&add_req("1.0.0"), &ipam, &dp).unwrap();
        let del_req = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        del(&del_req, &ipam, &dp).unwrap();
        del(&del_req, &ipam, &dp).unwrap();
        assert!(ipam.held.borrow().is_empty());
        assert_eq!(dp.teardowns(), 2);
    }

    #[test]
    fn del_without_or_with_a_gone_netns_tears_down_the_host_side() {
        for netns in ["", "/nonexistent/netns/p1"] {
            let dp = FakeDataplane::new();
            let a = attachment(request("DEL", "1.0.0", netns, json!({})));
            del(&a, &FakeIpam::default(), &dp).unwrap();
            let host_veth = a.host_veth();
            assert_eq!(
                dp.calls(),
                vec![
                    Call::LinkIndex {
                        host_veth: host_veth.clone()
                    },
                    Call::Teardown { host_veth }
                ]
            );
        }
    }

    #[test]
    fn del_hands_the_host_veth_to_ipamd_when_it_takes_it() {
        let ipam = FakeIpam {
            unplugs: true,
            ..FakeIpam::default()
        };
        let dp = FakeDataplane {
            host_index: Some(7),
            ..FakeDataplane::new()
        };
        add(&add_req("1.0.0"), &ipam, &dp).unwrap();
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        del(&a, &ipam, &dp).unwrap();
        assert!(ipam.held.borrow().is_empty());
        assert_eq!(ipam.calls(), ["allocate", "release+unplug"]);
        assert_eq!(dp.teardowns(), 0, "ipamd deletes the veth");
    }

    #[test]
    fn del_tears_down_itself_when_an_older_ipamd_ignores_the_veth() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane {
            host_index: Some(7),
            ..FakeDataplane::new()
        };
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        del(&a, &ipam, &dp).unwrap();
        assert_eq!(ipam.calls(), ["release+unplug"]);
        assert_eq!(dp.teardowns(), 1);
    }

    #[test]
    fn del_with_ipamd_unreachable_still_tears_down_and_succeeds() {
        let ipam = FakeIpam {
            fail: Some(|| IpamClientError::Unreachable("ipamd is not reachable at /s".into())),
            ..FakeIpam::default()
        };
        let dp = FakeDataplane::new();
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        del(&a, &ipam, &dp).unwrap();
        assert_eq!(dp.teardowns(), 1);
    }

    #[test]
    fn del_with_other_ipamd_errors_fails() {
        let ipam = FakeIpam {
            fail: Some(|| IpamClientError::Internal("store".into())),
            ..FakeIpam::default()
        };
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        assert_eq!(del(&a, &ipam, &FakeDataplane::new()).unwrap_err().code, 106);
    }

    #[test]
    fn del_during_a_version_skew_unplugs_and_succeeds() {
        let ipam = FakeIpam {
            fail: Some(|| IpamClientError::VersionMismatch("plugin 0.2.0, ipamd 0.1.0".into())),
            ..FakeIpam::default()
        };
        let dp = FakeDataplane::new();
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        del(&a, &ipam, &dp).unwrap();
        assert_eq!(dp.teardowns(), 1);
    }

    #[test]
    fn del_reports_a_failed_teardown_after_releasing() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane {
            fail_teardown: Some(Box::new(|| DataplaneError::Netlink {
                op: "del link".into(),
                detail: "EBUSY".into(),
            })),
            ..FakeDataplane::new()
        };
        let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
        assert_eq!(del(&a, &ipam, &dp).unwrap_err().code, 105);
        // The address went to cooldown; the runtime's retried DEL is a no-op for ipamd.
        assert_eq!(ipam.calls(), vec!["release".to_string()]);
    }

    fn check_req(version: &str, prev: Value) -> Attachment {
        attachment(request(
            "CHECK",
            version,
            NETNS,
            json!({"prevResult": prev}),
        ))
    }

    #[test]
    fn check_passes_when_prev_result_ipamd_and_dataplane_agree() {
        for version in ["0.4.0", "1.0.0", "1.1.0"] {
            let ipam = FakeIpam::default();
            let dp = FakeDataplane::new();
            let prev = add(&add_req(version), &ipam, &dp).unwrap();
            check(&check_req(version, prev), &ipam, &dp).unwrap();
            assert!(matches!(dp.calls().last(), Some(Call::Check(_))));
        }
    }

    #[test]
    fn check_mismatch_is_107_naming_both_sides() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        let mut prev = add(&add_req("1.0.0"), &ipam, &dp).unwrap();
        prev["ips"][0]["address"] = json!("10.244.0.99/32");
        let e = check(&check_req("1.0.0", prev.clone()), &ipam, &dp).unwrap_err();
        assert_eq!(e.code, 107);
        assert!(
            e.msg.contains("10.244.0.99/32") && e.msg.contains("10.244.0.1/32"),
            "{}",
            e.msg
        );

        // ipamd holds nothing.
        let e = check(&check_req("1.0.0", prev), &FakeIpam::default(), &dp).unwrap_err();
        assert_eq!(e.code, 107);

        // The dataplane disagrees.
        let ipam = FakeIpam::default();
        let prev = add(&add_req("1.0.0"), &ipam, &FakeDataplane::new()).unwrap();
        let dp = FakeDataplane {
            fail_check: Some(Box::new(|| {
                DataplaneError::Mismatch("route missing".into())
            })),
            ..FakeDataplane::new()
        };
        assert_eq!(
            check(&check_req("1.0.0", prev), &ipam, &dp)
                .unwrap_err()
                .code,
            107
        );
    }

    #[test]
    fn check_without_prev_result_is_invalid_config() {
        let a = attachment(request("CHECK", "1.0.0", NETNS, json!({})));
        let e = check(&a, &FakeIpam::default(), &FakeDataplane::new()).unwrap_err();
        assert_eq!(e.code, 7);
    }

    fn status_req() -> StatusRequest {
        let Request::Status(s) = parse(
            |k| (k == "CNI_COMMAND").then(|| "STATUS".to_string()),
            br#"{"cniVersion":"1.1.0","name":"ferry","type":"ferry"}"#,
        )
        .unwrap() else {
            panic!()
        };
        s
    }

    #[test]
    fn status_codes() {
        let ready = FakeIpam::default();
        assert!(status(&status_req(), &ready).is_ok());
        for (readiness, want) in [(Readiness::NotAvailable, 50), (Readiness::NoAddresses, 51)] {
            let ipam = FakeIpam {
                readiness: Some(readiness),
                ..FakeIpam::default()
            };
            assert_eq!(status(&status_req(), &ipam).unwrap_err().code, want);
        }
        let down = FakeIpam {
            fail: Some(|| IpamClientError::Unreachable("ipamd is not reachable at /s".into())),
            ..FakeIpam::default()
        };
        let e = status(&status_req(), &down).unwrap_err();
        assert_eq!(e.code, 50);
        assert!(e.msg.contains("/s"));
    }

    #[test]
    fn gc_releases_the_invalid_and_removes_their_host_veths() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        add(&add_req("1.1.0"), &ipam, &dp).unwrap();
        ipam.allocate(
            &Key {
                network: "ferry".into(),
                container_id: "ctr2".into(),
                ifname: "eth0".into(),
            },
            &PodInfo::default(),
            &[],
            None,
        )
        .unwrap();
        let req = GcRequest {
            conf: add_req("1.1.0").conf,
            valid: vec![ValidAttachment {
                container_id: "ctr1".into(),
                ifname: "eth0".into(),
            }],
            tolerated: Vec::new(),
        };
        let dp = FakeDataplane::new();
        gc(&req, &ipam, &dp).unwrap();
        assert_eq!(ipam.held.borrow().len(), 1);
        assert_eq!(
            dp.calls(),
            vec![Call::Teardown {
                host_veth: ferry_proto::host_veth_name("ctr2", "eth0"),
            }]
        );
    }

    #[test]
    fn run_dispatches_and_status_prints_nothing() {
        let ipam = FakeIpam::default();
        let dp = FakeDataplane::new();
        assert_eq!(
            run(&Request::Status(status_req()), &ipam, &dp).unwrap(),
            None
        );
        let v = run(&Request::Version { requested: None }, &ipam, &dp)
            .unwrap()
            .unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
