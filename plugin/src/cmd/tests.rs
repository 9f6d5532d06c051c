mod fake_dataplane;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::json;

use super::*;
use crate::cni::config::ValidAttachment;
use crate::cni::request::parse;
use crate::ipam::{Lease, PodInfo};
use fake_dataplane::{Call, FakeDataplane};
use ferry::dataplane::DataplaneError;

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

/// DEL against an ipamd whose every call fails with `fail`: what DEL
/// returned, and how many teardowns it made itself.
fn del_with_ipamd_failing(fail: fn() -> IpamClientError) -> (Result<(), CniError>, usize) {
    let ipam = FakeIpam {
        fail: Some(fail),
        ..FakeIpam::default()
    };
    let dp = FakeDataplane::new();
    let a = attachment(request("DEL", "1.0.0", NETNS, json!({})));
    (del(&a, &ipam, &dp), dp.teardowns())
}

#[test]
fn del_with_ipamd_unreachable_still_tears_down_and_succeeds() {
    let (result, teardowns) = del_with_ipamd_failing(|| {
        IpamClientError::Unreachable("ipamd is not reachable at /s".into())
    });
    result.unwrap();
    assert_eq!(teardowns, 1);
}

#[test]
fn del_with_other_ipamd_errors_fails() {
    let (result, _) = del_with_ipamd_failing(|| IpamClientError::Internal("store".into()));
    assert_eq!(result.unwrap_err().code, 106);
}

#[test]
fn del_during_a_version_skew_unplugs_and_succeeds() {
    let (result, teardowns) = del_with_ipamd_failing(|| {
        IpamClientError::VersionMismatch("plugin 0.2.0, ipamd 0.1.0".into())
    });
    result.unwrap();
    assert_eq!(teardowns, 1);
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
