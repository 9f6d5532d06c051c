use super::*;

fn ours() -> AddResult {
    let addrs = ["10.244.0.5/32".parse().unwrap()];
    AddResult::for_pod(&Wired {
        host_veth: "fry0123456789a",
        host_mac: [0xee, 0xee, 0xee, 0xee, 0xee, 0x01],
        ifname: "eth0",
        pod_mac: [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05],
        netns: Path::new("/var/run/netns/p1"),
        addresses: &addrs,
        gateway: ferry_proto::POD_GATEWAY,
    })
    .unwrap()
}

#[test]
fn v1_result_has_no_ip_version() {
    for v in [CniVersion::V1_0_0, CniVersion::V1_1_0] {
        let r = ours().render(v, None).unwrap();
        assert_eq!(
            r,
            json!({
                "cniVersion": v.as_str(),
                "interfaces": [
                    {"name": "fry0123456789a", "mac": "ee:ee:ee:ee:ee:01"},
                    {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/p1"}
                ],
                "ips": [{"address": "10.244.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {}
            })
        );
    }
}

#[test]
fn pre_1_0_results_carry_ip_version_4() {
    for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
        let r = ours().render(v, None).unwrap();
        assert_eq!(r["cniVersion"], v.as_str());
        assert_eq!(
            r["ips"],
            json!([{"version": "4", "address": "10.244.0.5/32",
                    "gateway": "169.254.1.1", "interface": 1}])
        );
        assert!(r["interfaces"][0].get("sandbox").is_none());
    }
}

#[test]
fn chained_prev_result_is_kept_and_indices_shift() {
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "lo0", "sandbox": "/x", "mtu": 65536}],
        "ips": [{"address": "fd00::1/128", "interface": 0}],
        "routes": [{"dst": "fd00::/8", "table": 100}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let r = ours().render(CniVersion::V1_1_0, Some(&prev)).unwrap();
    assert_eq!(r["interfaces"][0], prev["interfaces"][0]);
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["ips"][1]["interface"], 2);
    assert_eq!(r["routes"][0]["table"], 100);
    assert_eq!(r["dns"], prev["dns"]);

    // Rendered for 0.4.0, the foreign ip gets its family too.
    let r = ours().render(CniVersion::V0_4_0, Some(&prev)).unwrap();
    assert_eq!(r["ips"][0]["version"], "6");
    assert_eq!(r["ips"][1]["version"], "4");
}

#[test]
fn prev_result_addresses_read_back_our_own_result() {
    for v in CniVersion::ALL {
        let r = ours().render(v, None).unwrap();
        let got = super::super::config::prev_result_addresses(&r, "eth0").unwrap();
        assert_eq!(got, vec!["10.244.0.5/32".parse::<Ipv4Net>().unwrap()]);
    }
}
