use super::*;
use serde_json::json;

#[test]
fn defaults_apply() {
    let c =
        NetConf::from_value(json!({"cniVersion":"1.0.0","name":"ferry","type":"ferry"})).unwrap();
    assert_eq!(c.ipamd.socket, PathBuf::from("/run/ferry/ipamd.sock"));
    assert_eq!(c.ipamd.timeout_ms, 5000);
    assert_eq!(c.mtu, 0);
    assert_eq!(c.log_file, "/var/log/ferry/cni.log");
    assert_eq!(c.log_level, "info");
}

#[test]
fn plugin_fields_parse() {
    let c = NetConf::from_value(json!({
        "cniVersion":"1.1.0","name":"n","type":"ferry",
        "ipamd":{"socket":"/tmp/s.sock","timeoutMs":250},
        "mtu":1400,"logFile":"","logLevel":"debug"
    }))
    .unwrap();
    assert_eq!(c.ipamd.socket, PathBuf::from("/tmp/s.sock"));
    assert_eq!(c.ipamd.timeout_ms, 250);
    assert_eq!(c.mtu, 1400);
    assert_eq!(c.log_file, "");
}

/// `fields` over a minimal valid config.
fn conf_with(fields: Value) -> Value {
    let mut v = json!({"cniVersion":"1.0.0","name":"n","type":"ferry"});
    if let (Some(c), Some(f)) = (v.as_object_mut(), fields.as_object()) {
        c.extend(f.clone());
    }
    v
}

#[test]
fn bad_fields_are_code_7_naming_their_path() {
    let long_socket = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
    for (fields, want) in [
        (json!({"name":""}), "name: missing"),
        (json!({"name":5}), "name: invalid type"),
        (json!({"mtu":"big"}), "mtu: invalid type: string \"big\""),
        (json!({"mtu":-1}), "mtu: invalid value"),
        (json!({"mtu":1.5}), "mtu: invalid type"),
        (json!({"mtu":10}), "mtu: 10 is out of range"),
        (json!({"mtu":67}), "mtu: 67 is out of range"),
        (json!({"mtu":65536}), "mtu: 65536 is out of range"),
        (json!({"ipamd":"x"}), "ipamd: invalid type"),
        (json!({"ipamd":{"socket":5}}), "ipamd.socket: invalid type"),
        (
            json!({"ipamd":{"socket":""}}),
            "ipamd.socket: must not be empty",
        ),
        (
            json!({"ipamd":{"socket":"run/ipamd.sock"}}),
            "ipamd.socket: run/ipamd.sock is not an absolute path",
        ),
        (
            json!({"ipamd":{"socket":"/run/a\0b"}}),
            "ipamd.socket: contains a NUL",
        ),
        (
            json!({"ipamd":{"socket":long_socket}}),
            "ipamd.socket: /sss",
        ),
        (
            json!({"ipamd":{"timeoutMs":0}}),
            "ipamd.timeoutMs: 0 is out of range",
        ),
        (
            json!({"ipamd":{"timeoutMs":600_001}}),
            "ipamd.timeoutMs: 600001 is out of range",
        ),
        (
            json!({"ipamd":{"timeoutMs":"5s"}}),
            "ipamd.timeoutMs: invalid type",
        ),
        (
            json!({"logLevel":"verbose"}),
            "logLevel: \"verbose\" is not a level",
        ),
        (
            json!({"logLevel":"warn,debgu"}),
            "logLevel: \"debgu\" is not a level",
        ),
        (json!({"logLevel":"ferry=loud"}), "logLevel: \"ferry=loud\""),
        (json!({"logLevel":""}), "logLevel: must not be empty"),
        (json!({"logLevel":7}), "logLevel: invalid type"),
        (json!({"logFile":false}), "logFile: invalid type"),
        (
            json!({"cni.dev/valid-attachments":[{"containerID":"a"}]}),
            "cni.dev/valid-attachments[0]: missing field `ifname`",
        ),
    ] {
        let e = NetConf::from_value(conf_with(fields.clone())).unwrap_err();
        assert_eq!(e.code, 7, "{fields}");
        assert_eq!(
            e.msg
                .strip_prefix("invalid network config: ")
                .map(|m| m.starts_with(want)),
            Some(true),
            "{fields}: {}",
            e.msg
        );
    }
}

#[test]
fn values_at_the_edges_of_their_ranges_are_fine() {
    for fields in [
        json!({"mtu":0}),
        json!({"mtu":68}),
        json!({"mtu":65535}),
        json!({"ipamd":{"timeoutMs":1}}),
        json!({"ipamd":{"timeoutMs":600_000}}),
        json!({"ipamd":{"socket":format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1))}}),
        json!({"logLevel":"off"}),
        json!({"logLevel":"TRACE"}),
        json!({"logLevel":"ferry=debug,h2=info"}),
    ] {
        let r = NetConf::from_value(conf_with(fields.clone()));
        assert!(r.is_ok(), "{fields}: {r:?}");
    }
}

#[test]
fn log_directive_scopes_a_bare_level_to_ferry() {
    assert_eq!(
        log_directive(" debug ").unwrap(),
        "warn,ferry=debug,ferry_proto=debug"
    );
    assert_eq!(log_directive("ferry=trace").unwrap(), "ferry=trace");
}

#[test]
fn fields_we_never_read_do_not_fail_the_config() {
    // cni-plugin's RuntimeConfig would reject the sctp mapping.
    let c = NetConf::from_value(json!({
        "cniVersion":"1.0.0","name":"n","type":"ferry","ipMasq":"yes",
        "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}
    }));
    assert!(c.is_ok());
}

#[test]
fn requested_ips_from_args_and_runtime_config() {
    let c = NetConf::from_value(json!({
        "cniVersion":"1.0.0","name":"n",
        "args":{"cni":{"ips":["10.0.0.5/24"]}},
        "runtimeConfig":{"ips":["10.0.0.6"]}
    }))
    .unwrap();
    assert_eq!(
        c.requested_ips().unwrap(),
        vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
    );
    let bad = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n",
        "runtimeConfig":{"ips":["fd00::5/64"]}}))
    .unwrap();
    let e = bad.requested_ips().unwrap_err();
    assert_eq!(e.code, 7);
    assert!(e.msg.starts_with("runtimeConfig.ips[0]: "), "{}", e.msg);
}

#[test]
fn pool_hint_from_pod_annotations() {
    let c = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n",
        "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"ferry.dev/pool":"blue","x":"y"}}}))
    .unwrap();
    assert_eq!(c.pool_hint().as_deref(), Some("blue"));
    let none = NetConf::from_value(json!({"cniVersion":"1.0.0","name":"n"})).unwrap();
    assert_eq!(none.pool_hint(), None);
}

#[test]
fn prev_result_addresses_any_version() {
    let v04 = json!({"cniVersion":"0.4.0",
        "interfaces":[{"name":"fryabc"},{"name":"eth0","sandbox":"/x"},{"name":"net1","sandbox":"/x"}],
        "ips":[{"version":"4","address":"10.0.0.2/32","interface":1},
               {"version":"4","address":"10.9.0.2/24","interface":2},
               {"version":"6","address":"fd00::2/128","interface":1}]});
    assert_eq!(
        prev_result_addresses(&v04, "eth0").unwrap(),
        vec!["10.0.0.2/32".parse::<Ipv4Net>().unwrap()]
    );
    let v1 = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3/32"}]});
    assert_eq!(prev_result_addresses(&v1, "eth0").unwrap().len(), 1);
    let v02 = json!({"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.4/32"}});
    assert_eq!(prev_result_addresses(&v02, "eth0").unwrap().len(), 1);
    assert!(
        prev_result_addresses(&json!({}), "eth0")
            .unwrap()
            .is_empty()
    );
    assert!(prev_result_addresses(&json!({"ips":[{"address":"x"}]}), "eth0").is_err());
}
