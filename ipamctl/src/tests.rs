use std::path::{Path, PathBuf};

use clap::Parser;
use ferry_proto::v1 as pb;
use tonic::Status;

use crate::client::rpc_error;
use crate::commands::{parse_target, pool_request};
use crate::render::{
    AllocationJson, POOL_HEADERS, PoolJson, age, duration_text, format_table, pool_row, utc,
};
use crate::{Cli, Cmd, PoolCmd};

#[test]
fn json_flag_works_before_or_after_the_subcommand() {
    let a = Cli::try_parse_from(["ipamctl", "--json", "status"]).unwrap();
    let b = Cli::try_parse_from(["ipamctl", "status", "--json"]).unwrap();
    assert!(a.json && b.json);
    let c = Cli::try_parse_from(["ipamctl", "show", "10.0.0.1", "--socket", "/x.sock"]).unwrap();
    assert_eq!(c.socket, PathBuf::from("/x.sock"));
}

#[test]
fn pool_and_gc_commands_parse() {
    let c = Cli::try_parse_from([
        "ipamctl",
        "pool",
        "add",
        "blue",
        "10.50.0.0/24",
        "--block-size",
        "28",
        "--namespace",
        "a",
        "--namespace",
        "b",
        "--nat-outgoing",
        "--snat-address",
        "192.0.2.7",
        "--isolated",
        "--allow-from",
        "default",
        "--json",
    ])
    .unwrap();
    assert!(c.json);
    let Cmd::Pool {
        cmd: PoolCmd::Add(a),
    } = &c.cmd
    else {
        panic!("{c:?}")
    };
    let p = pool_request(a);
    assert_eq!(
        (p.name.as_str(), p.cidr.as_str(), p.block_size),
        ("blue", "10.50.0.0/24", 28)
    );
    assert_eq!(p.namespaces, ["a", "b"]);
    assert!(p.nat_outgoing && p.isolated);
    assert_eq!(p.snat_address, "192.0.2.7");
    assert_eq!(p.allow_from, ["default"]);
    assert!(
        Cli::try_parse_from([
            "ipamctl",
            "pool",
            "add",
            "x",
            "10.0.0.0/24",
            "--snat-address",
            "nope"
        ])
        .is_err()
    );
    for argv in [["ipamctl", "pool", "ls"], ["ipamctl", "pool", "list"]] {
        let c = Cli::try_parse_from(argv).unwrap();
        assert!(matches!(c.cmd, Cmd::Pool { cmd: PoolCmd::Ls }));
    }
    let c = Cli::try_parse_from(["ipamctl", "pool", "rm", "blue"]).unwrap();
    assert!(matches!(c.cmd, Cmd::Pool { cmd: PoolCmd::Rm { ref name } } if name == "blue"));
    let c = Cli::try_parse_from(["ipamctl", "gc", "--dry-run", "--json"]).unwrap();
    assert!(c.json && matches!(c.cmd, Cmd::Gc { dry_run: true }));
    let c = Cli::try_parse_from(["ipamctl", "gc"]).unwrap();
    assert!(matches!(c.cmd, Cmd::Gc { dry_run: false }));
}

#[test]
fn pool_rows_show_every_option() {
    let u = pb::PoolUsage {
        pool: Some(pb::Pool {
            name: "blue".into(),
            cidr: "10.50.0.0/24".into(),
            block_size: 28,
            namespaces: vec!["a".into(), "b".into()],
            nat_outgoing: true,
            snat_address: "192.0.2.7".into(),
            isolated: true,
            allow_from: vec!["default".into()],
            is_default: false,
        }),
        size: 254,
        allocated: 3,
        cooling: 1,
        blocks: 1,
    };
    assert_eq!(
        pool_row(&u),
        vec![
            "blue",
            "10.50.0.0/24",
            "/28",
            "a,b",
            "yes",
            "192.0.2.7",
            "yes",
            "default",
            "254",
            "3",
            "1",
            "1"
        ]
    );
    assert_eq!(pool_row(&u).len(), POOL_HEADERS.len());
    let v = serde_json::to_value(PoolJson::from(&pb::PoolUsage::default())).unwrap();
    for k in [
        "name",
        "cidr",
        "blockSize",
        "namespaces",
        "natOutgoing",
        "snatAddress",
        "isolated",
        "allowFrom",
        "isDefault",
        "size",
        "allocated",
        "cooling",
        "blocks",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
}

#[test]
fn targets() {
    assert!(matches!(
        parse_target("10.244.0.5").target,
        Some(pb::target::Target::Ip(ip)) if ip == "10.244.0.5"
    ));
    assert!(matches!(
        parse_target("10.244.0.5/32").target,
        Some(pb::target::Target::Ip(ip)) if ip == "10.244.0.5"
    ));
    assert!(matches!(
        parse_target("abcdef012345").target,
        Some(pb::target::Target::ContainerId(c)) if c == "abcdef012345"
    ));
}

#[test]
fn allocation_json_has_contract_keys() {
    let a = pb::Allocation {
        key: Some(pb::AllocationKey {
            network: "ferry".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
        }),
        ip: "10.0.0.1".into(),
        pool: "default".into(),
        block: "10.0.0.0/26".into(),
        pod: Some(pb::PodMeta {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            netns: "/n".into(),
        }),
        created_unix_ms: 5,
    };
    let v = serde_json::to_value(AllocationJson::from(&a)).unwrap();
    for k in [
        "ip",
        "containerId",
        "ifname",
        "network",
        "pool",
        "block",
        "namespace",
        "pod",
        "podUid",
        "netns",
        "createdUnixMs",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
}

#[test]
fn tables_align() {
    let t = format_table(
        &["IP", "POOL"],
        &[
            vec!["10.0.0.1".into(), "default".into()],
            vec!["10.0.0.10".into(), "a".into()],
        ],
    );
    assert_eq!(t, "IP         POOL\n10.0.0.1   default\n10.0.0.10  a\n");
}

#[test]
fn times() {
    assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
    assert_eq!(utc(1_700_000_000_500), "2023-11-14T22:13:20Z");
    assert_eq!(duration_text(5_000), "5s");
    assert_eq!(duration_text(600_000), "10m");
    assert_eq!(duration_text(3 * 86_400_000), "3d");
    assert_eq!(age(10, 0), "-");
}

#[test]
fn failed_calls_name_the_socket_only_when_the_transport_is_at_fault() {
    let socket = Path::new("/run/x.sock");
    let text = |s| format!("{:#}", rpc_error(socket, s));
    assert_eq!(
        text(Status::unimplemented("no Gc")),
        "ipamd at /run/x.sock does not support this command yet: no Gc (upgrade ipamd)"
    );
    assert_eq!(
        text(Status::unavailable("gone")),
        "ipamd at /run/x.sock did not answer: gone (Unavailable)"
    );
    assert_eq!(
        text(Status::deadline_exceeded("slow")),
        "ipamd at /run/x.sock did not answer: slow (DeadlineExceeded)"
    );
    assert_eq!(
        text(Status::failed_precondition(
            "pool blue still holds 2 allocation(s)"
        )),
        "pool blue still holds 2 allocation(s) (FailedPrecondition)"
    );
}
