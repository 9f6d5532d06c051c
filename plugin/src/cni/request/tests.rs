use super::*;
use std::collections::HashMap;

fn env<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn conf(version: &str) -> Vec<u8> {
    format!(r#"{{"cniVersion":"{version}","name":"ferry","type":"ferry"}}"#).into_bytes()
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c0ffee"),
    ("CNI_NETNS", "/var/run/netns/p1"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u1",
    ),
];

/// `base` with `key` replaced by `val`.
fn with<K: AsRef<str>, V: AsRef<str>>(
    base: &[(K, V)],
    key: &str,
    val: &str,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = base
        .iter()
        .filter(|(k, _)| k.as_ref() != key)
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
        .collect();
    out.push((key.to_string(), val.to_string()));
    out
}

#[test]
fn add_parses_for_every_version() {
    for v in CniVersion::ALL {
        let req = parse(env(ADD), &conf(v.as_str())).unwrap();
        let Request::Add(a) = req else {
            panic!("not ADD")
        };
        assert_eq!(a.version, v);
        assert_eq!(a.container_id, "c0ffee");
        assert_eq!(a.ifname, "eth0");
        assert_eq!(a.netns, Some(PathBuf::from("/var/run/netns/p1")));
        assert_eq!(a.key().network, "ferry");
        let pod = a.pod_info();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
            ("default", "web", "u1")
        );
        assert_eq!(pod.netns, "/var/run/netns/p1");
    }
}

#[test]
fn unsupported_versions_are_code_1() {
    for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0"] {
        let e = parse(env(ADD), &conf(v)).unwrap_err();
        assert_eq!(e.code, 1, "{v}");
        assert!(e.details.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"));
    }
    let e = parse(env(ADD), br#"{"name":"ferry","type":"ferry"}"#).unwrap_err();
    assert_eq!(e.code, 1);
}

#[test]
fn malformed_stdin_is_code_6() {
    for stdin in [&b""[..], b"{", b"not json", b"[1,2]", b"\"s\""] {
        assert_eq!(parse(env(ADD), stdin).unwrap_err().code, 6);
    }
}

#[test]
fn missing_env_is_code_4_naming_the_variable() {
    let e = parse(env::<&str, &str>(&[]), &conf("1.0.0")).unwrap_err();
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("CNI_COMMAND"));

    for var in ["CNI_CONTAINERID", "CNI_IFNAME"] {
        let e = parse(env(&with(ADD, var, "")), &conf("1.0.0")).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains(var), "{}", e.msg);
    }
    let e = parse(env(&with(ADD, "CNI_COMMAND", "FROB")), &conf("1.0.0")).unwrap_err();
    assert_eq!(e.code, 4);
}

#[test]
fn bad_container_id_and_ifname_are_code_4_naming_the_variable() {
    for (k, v) in [
        ("CNI_CONTAINERID", "-abc"),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_IFNAME", ""),
        ("CNI_IFNAME", "."),
        ("CNI_IFNAME", ".."),
        ("CNI_IFNAME", "0123456789abcdef"),
        ("CNI_IFNAME", "eth 0"),
        ("CNI_IFNAME", "eth0\t"),
        ("CNI_IFNAME", "a/b"),
        ("CNI_IFNAME", "eth0:1"),
        ("CNI_IFNAME", "eth%d"),
    ] {
        for verb in ["ADD", "DEL", "CHECK"] {
            let e = parse(
                env(&with(&with(ADD, k, v), "CNI_COMMAND", verb)),
                &conf("1.0.0"),
            )
            .unwrap_err();
            assert_eq!(e.code, 4, "{verb} {k}={v:?}");
            assert!(e.msg.contains(k), "{verb} {k}={v:?}: {}", e.msg);
        }
    }
    // 15 bytes is the most the kernel takes.
    assert!(
        parse(
            env(&with(ADD, "CNI_IFNAME", "0123456789abcde")),
            &conf("1.0.0")
        )
        .is_ok()
    );
}

#[test]
fn del_goes_on_despite_values_it_does_not_use() {
    let bad_conf =
        br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry","mtu":10,"logLevel":"loud"}"#;
    for verb in ["ADD", "CHECK"] {
        let e = parse(env(&with(ADD, "CNI_COMMAND", verb)), bad_conf).unwrap_err();
        assert_eq!(e.code, 7, "{verb}");
        assert!(e.msg.contains("mtu"), "{verb}: {}", e.msg);
    }
    let del = with(&with(ADD, "CNI_COMMAND", "DEL"), "CNI_ARGS", "FOO=1");
    let Request::Del(a) = parse(env(&del), bad_conf).unwrap() else {
        panic!("not DEL")
    };
    assert_eq!(a.tolerated.len(), 2, "{:?}", a.tolerated);
    assert!(a.tolerated[0].contains("mtu") && a.tolerated[1].contains("CNI_ARGS"));
    let gc = br#"{"cniVersion":"1.1.0","name":"ferry","type":"ferry","mtu":10,"cni.dev/valid-attachments":[]}"#;
    let Request::Gc(g) = parse(env(&with(ADD, "CNI_COMMAND", "GC")), gc).unwrap() else {
        panic!("not GC")
    };
    assert!(
        g.tolerated.len() == 1 && g.tolerated[0].contains("mtu"),
        "{:?}",
        g.tolerated
    );
    // What DEL does need still fails it.
    let no_socket =
        br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry","ipamd":{"socket":"x"}}"#;
    assert_eq!(parse(env(&del), no_socket).unwrap_err().code, 7);
}

#[test]
fn empty_netns_is_allowed_here_and_left_to_the_verb() {
    let req = parse(env(&with(ADD, "CNI_COMMAND", "DEL")), &conf("1.0.0")).unwrap();
    assert!(matches!(req, Request::Del(_)));
    let no_netns = with(&with(ADD, "CNI_COMMAND", "DEL"), "CNI_NETNS", "");
    let Request::Del(a) = parse(env(&no_netns), &conf("1.0.0")).unwrap() else {
        panic!()
    };
    assert_eq!(a.netns, None);
}

#[test]
fn check_needs_0_4_0() {
    let check = with(ADD, "CNI_COMMAND", "CHECK");
    for v in ["0.3.0", "0.3.1"] {
        let e = parse(env(&check), &conf(v)).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("CHECK"));
    }
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(matches!(
            parse(env(&check), &conf(v)),
            Ok(Request::Check(_))
        ));
    }
}

#[test]
fn status_and_gc_need_1_1_0_and_no_container() {
    let status = [("CNI_COMMAND", "STATUS")];
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        assert_eq!(parse(env(&status), &conf(v)).unwrap_err().code, 1);
    }
    assert!(matches!(
        parse(env(&status), &conf("1.1.0")),
        Ok(Request::Status(_))
    ));

    let gc = [("CNI_COMMAND", "GC")];
    let stdin = br#"{"cniVersion":"1.1.0","name":"ferry","type":"ferry",
        "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
    let Request::Gc(g) = parse(env(&gc), stdin).unwrap() else {
        panic!()
    };
    assert_eq!(g.valid.len(), 1);
    assert_eq!(g.valid[0].container_id, "a");
    assert_eq!(parse(env(&gc), &conf("1.0.0")).unwrap_err().code, 1);
    // No list at all: refuse rather than release everything.
    assert_eq!(parse(env(&gc), &conf("1.1.0")).unwrap_err().code, 7);
}

#[test]
fn version_needs_no_config() {
    let v = [("CNI_COMMAND", "VERSION")];
    assert!(matches!(
        parse(env(&v), b""),
        Ok(Request::Version { requested: None })
    ));
    let Ok(Request::Version { requested }) = parse(env(&v), &conf("0.4.0")) else {
        panic!()
    };
    assert_eq!(requested.as_deref(), Some("0.4.0"));
}

#[test]
fn requested_ips_merge_all_three_sources() {
    let e = with(ADD, "CNI_ARGS", "IgnoreUnknown=1;IP=10.0.0.7/16");
    let stdin = br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry",
        "args":{"cni":{"ips":["10.0.0.8/24","10.0.0.7"]}},
        "runtimeConfig":{"ips":["10.0.0.9/32"],
          "io.kubernetes.cri.pod-annotations":{"ferry.dev/pool":"blue"}}}"#;
    let Request::Add(a) = parse(env(&e), stdin).unwrap() else {
        panic!()
    };
    let want: Vec<Ipv4Addr> = ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(a.requested_ips, want);
    assert_eq!(a.pool_hint.as_deref(), Some("blue"));
}

#[test]
fn bad_cni_args_fail_add_but_not_del() {
    let bad = with(ADD, "CNI_ARGS", "UNKNOWN=1");
    assert_eq!(parse(env(&bad), &conf("1.0.0")).unwrap_err().code, 4);
    let del = with(&bad, "CNI_COMMAND", "DEL");
    assert!(matches!(
        parse(env(&del), &conf("1.0.0")),
        Ok(Request::Del(_))
    ));
}

#[test]
fn bad_network_name_is_code_7() {
    let stdin = br#"{"cniVersion":"1.0.0","name":"bad name","type":"ferry"}"#;
    assert_eq!(parse(env(ADD), stdin).unwrap_err().code, 7);
}

#[test]
fn error_version_echoes_stdin() {
    assert_eq!(error_version(&conf("0.3.1")), "0.3.1");
    assert_eq!(error_version(b"garbage"), "1.1.0");
}
