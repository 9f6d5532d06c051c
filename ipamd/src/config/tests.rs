use std::net::Ipv4Addr;

use super::*;

fn node() -> Option<String> {
    Some("host-a".to_string())
}

fn parse(text: &str) -> FileConfig {
    parse_file(Path::new("test.toml"), text).expect("parses")
}

fn err_text(r: Result<Config, ConfigError>) -> String {
    r.expect_err("should fail").to_string()
}

#[test]
fn defaults_apply_when_nothing_is_given() {
    let c = Config::merge(Cli::default(), FileConfig::default(), node).unwrap();
    assert_eq!(c.socket, PathBuf::from("/run/ferry/ipamd.sock"));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/ferry"));
    assert_eq!(c.node_name, "host-a");
    assert_eq!(c.pod_cidr, "10.244.0.0/16".parse::<Ipv4Net>().unwrap());
    assert_eq!(c.block_size, 26);
    assert_eq!(c.cooldown, Duration::from_secs(30));
    assert_eq!(c.reconcile_interval, Duration::from_secs(60));
    assert_eq!(c.stale_grace, Duration::from_secs(300));
    assert_eq!(c.block_idle_grace, Duration::from_secs(600));
    assert_eq!(c.mtu, None);
    assert_eq!(c.log_level, "info");
    assert_eq!(c.metrics_addr, Some("127.0.0.1:9641".parse().unwrap()));
    assert!(c.metrics_addr.unwrap().ip().is_loopback());
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools[0].name, "default");
    assert!(c.pools[0].is_default());
    let o = c.ipam_options();
    assert_eq!(o.node, "host-a");
    assert_eq!(o.pools, c.pools);
}

#[test]
fn block_size_and_periods_are_bounded_by_config_not_later() {
    let cli =
        Cli::try_parse_from(["ipamd", "--pod-cidr", "10.0.0.0/8", "--block-size", "12"]).unwrap();
    let msg = err_text(Config::merge(cli, FileConfig::default(), node));
    assert!(msg.contains("block_size") && msg.contains("16"), "{msg}");

    let cli =
        Cli::try_parse_from(["ipamd", "--reconcile-interval", "18446744073709551615"]).unwrap();
    let msg = err_text(Config::merge(cli, FileConfig::default(), node));
    assert!(msg.contains("reconcile_interval"), "{msg}");
    let msg = err_text(Config::merge(
        Cli::default(),
        parse("stale_grace = 99999999999"),
        node,
    ));
    assert!(msg.contains("stale_grace"), "{msg}");
}

#[test]
fn flag_beats_file_beats_default() {
    let file = parse(
        r#"
        socket = "/tmp/file.sock"
        node_name = "from-file"
        pod_cidr = "10.50.0.0/16"
        block_size = 24
        cooldown = 5
        mtu = 1400
        "#,
    );
    let cli = Cli::try_parse_from([
        "ipamd",
        "--socket",
        "/tmp/flag.sock",
        "--block-size",
        "28",
        "--mtu",
        "0",
    ])
    .unwrap();
    let c = Config::merge(cli, file, || panic!("hostname not needed")).unwrap();
    assert_eq!(c.socket, PathBuf::from("/tmp/flag.sock"));
    assert_eq!(c.node_name, "from-file");
    assert_eq!(c.pod_cidr.to_string(), "10.50.0.0/16");
    assert_eq!(c.block_size, 28);
    assert_eq!(c.cooldown, Duration::from_secs(5));
    // An explicit 0 on the command line means auto, over the file's 1400.
    assert_eq!(c.mtu, None);
    assert_eq!(c.reconcile_interval, Duration::from_secs(60));
}

#[test]
fn pools_from_file() {
    let file = parse(
        r#"
        pod_cidr = "10.244.0.0/16"
        [[pools]]
        name = "team-a"
        cidr = "10.99.0.0/20"
        block_size = 28
        namespaces = ["a", "a-staging"]
        nat_outgoing = true
        snat_address = "192.0.2.10"
        isolated = true
        allow_from = ["default"]
        [[pools]]
        name = "team-b"
        cidr = "10.98.0.0/24"
        namespaces = ["b"]
        "#,
    );
    let c = Config::merge(Cli::default(), file, node).unwrap();
    assert_eq!(c.pools.len(), 3);
    let a = &c.pools[1];
    assert_eq!(a.name, "team-a");
    assert_eq!(a.block_size, 28);
    assert_eq!(a.snat_address, Some(Ipv4Addr::new(192, 0, 2, 10)));
    assert!(a.nat_outgoing && a.isolated);
    assert_eq!(a.allow_from, vec!["default".to_string()]);
    // Inherits the global block size.
    assert_eq!(c.pools[2].block_size, 26);
}

#[test]
fn bad_pod_cidr_names_the_key() {
    let cli = Cli::try_parse_from(["ipamd", "--pod-cidr", "10.244.0.0/33"]).unwrap();
    let msg = err_text(Config::merge(cli, FileConfig::default(), node));
    assert!(msg.contains("pod_cidr"), "{msg}");
    let cli = Cli::try_parse_from(["ipamd", "--pod-cidr", "10.244.1.0/16"]).unwrap();
    let msg = err_text(Config::merge(cli, FileConfig::default(), node));
    assert!(
        msg.contains("pod_cidr") && msg.contains("10.244.0.0/16"),
        "{msg}"
    );
}

#[test]
fn block_size_must_fit_the_pool() {
    let cli = Cli::try_parse_from(["ipamd", "--block-size", "8"]).unwrap();
    let msg = err_text(Config::merge(cli, FileConfig::default(), node));
    assert!(msg.contains("block_size") && msg.contains("16"), "{msg}");
    let cli = Cli::try_parse_from(["ipamd", "--block-size", "33"]).unwrap();
    assert!(err_text(Config::merge(cli, FileConfig::default(), node)).contains("block_size"));
    let cli = Cli::try_parse_from(["ipamd", "--block-size", "32"]).unwrap();
    assert_eq!(
        Config::merge(cli, FileConfig::default(), node)
            .unwrap()
            .block_size,
        32
    );
}

#[test]
fn invalid_pools_are_named() {
    let cases = [
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.244.8.0/24\"\nnamespaces = [\"x\"]",
            "pools[0].cidr",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"bogus\"\nnamespaces = [\"x\"]",
            "pools[0].cidr",
        ),
        ("[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"", "pools"),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]\nblock_size = 20",
            "pools[0].block_size",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]\nsnat_address = \"nope\"",
            "pools[0].snat_address",
        ),
        (
            "[[pools]]\nname = \"default\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]",
            "pools[0].name",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]\n[[pools]]\nname = \"y\"\ncidr = \"10.8.0.0/24\"\nnamespaces = [\"x\"]",
            "pools[1].namespaces",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]\nallow_from = [\"ghost\"]",
            "pools[0].allow_from",
        ),
        // The allocator's rules for one pool apply in the file too.
        (
            "[[pools]]\nname = \"a/b\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]",
            "pools[0].name",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\", \" \"]",
            "pools[0].namespaces",
        ),
    ];
    for (text, key) in cases {
        let msg = err_text(Config::merge(Cli::default(), parse(text), node));
        assert!(msg.contains(key), "{key}: {msg}");
    }
}

#[test]
fn file_errors_name_the_key() {
    let e = parse_file(Path::new("f.toml"), "cooldown = 5\nblock_size = 300").unwrap_err();
    assert_eq!(
        e.to_string(),
        "config file f.toml: block_size: invalid value: integer `300`, expected u8 \
         (line 2, column 14)"
    );
    let e = parse_file(Path::new("f.toml"), "sokcet = \"/x\"").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config file f.toml: sokcet: unknown field `sokcet`"),
        "{e}"
    );
}

/// Every key, from the file and as a flag: a mistyped or out-of-range
/// value fails naming the key.
#[test]
fn every_bad_value_names_its_key() {
    let long_socket = format!("socket = \"/{}\"", "s".repeat(MAX_SOCKET_PATH));
    let toml_rows: &[(&str, &str)] = &[
        ("socket = 1", "socket: invalid type"),
        ("socket = \"\"", "invalid socket: must not be empty"),
        (
            "socket = \"ipamd.sock\"",
            "invalid socket: ipamd.sock is not an absolute",
        ),
        (&long_socket, "invalid socket: /sss"),
        ("state_dir = false", "state_dir: invalid type"),
        (
            "state_dir = \"state\"",
            "invalid state_dir: state is not an absolute",
        ),
        ("node_name = 7", "node_name: invalid type"),
        ("node_name = \" \"", "invalid node_name: must not be empty"),
        ("pod_cidr = 10", "pod_cidr: invalid type"),
        ("pod_cidr = \"10.0.0.0\"", "invalid pod_cidr"),
        ("block_size = \"26\"", "block_size: invalid type"),
        ("block_size = 300", "block_size: invalid value"),
        (
            "block_size = 12",
            "invalid block_size: 12 must be between 16",
        ),
        (
            "block_size = 33",
            "invalid block_size: 33 must be between 16",
        ),
        ("cooldown = -1", "cooldown: invalid value"),
        ("cooldown = 99999999999", "invalid cooldown"),
        (
            "reconcile_interval = 1.5",
            "reconcile_interval: invalid type",
        ),
        ("reconcile_interval = 0", "invalid reconcile_interval"),
        ("stale_grace = \"5m\"", "stale_grace: invalid type"),
        ("stale_grace = 99999999999", "invalid stale_grace"),
        ("block_idle_grace = true", "block_idle_grace: invalid type"),
        ("block_idle_grace = 99999999999", "invalid block_idle_grace"),
        ("mtu = \"big\"", "mtu: invalid type"),
        ("mtu = -1", "mtu: invalid value"),
        ("mtu = 67", "invalid mtu: 67 is out of range"),
        ("mtu = 65536", "invalid mtu: 65536 is out of range"),
        ("log_level = 3", "log_level: invalid type"),
        ("log_level = \"\"", "invalid log_level: must not be empty"),
        ("log_level = \"verbose\"", "invalid log_level: \"verbose\""),
        ("log_level = \"warn,debgu\"", "invalid log_level: \"debgu\""),
        ("log_level = \"ipamd=loud\"", "invalid log_level"),
        ("metrics_addr = 9641", "metrics_addr: invalid type"),
        ("metrics_addr = \"localhost:9641\"", "invalid metrics_addr"),
        ("sokcet = \"/x\"", "sokcet: unknown field"),
        ("pools = 5", "pools: invalid type"),
        (
            "[[pools]]\nname = \"x\"\ncidr = 5",
            "pools[0].cidr: invalid type",
        ),
        (
            "[[pools]]\nname = \"x\"\ncidrr = \"1\"",
            "pools[0].cidrr: unknown field",
        ),
        ("[[pools]]\nname = \"x\"", "pools[0]: missing field `cidr`"),
        (
            "[[pools]]\nname = \"x\"\ncidr = \"10.9.0.0/24\"\nnamespaces = [\"x\"]\nblock_size = -3",
            "pools[0].block_size: invalid value",
        ),
    ];
    for (text, want) in toml_rows {
        let msg = parse_file(Path::new("f.toml"), text)
            .and_then(|f| Config::merge(Cli::default(), f, node))
            .expect_err(text)
            .to_string();
        assert!(msg.contains(want), "{text:?}: {msg}");
    }
    let flag_rows: &[(&[&str], &str)] = &[
        (&["--socket", "ipamd.sock"], "invalid socket"),
        (&["--state-dir", "state"], "invalid state_dir"),
        (&["--block-size", "33"], "invalid block_size"),
        (&["--cooldown", "99999999999"], "invalid cooldown"),
        (&["--reconcile-interval", "0"], "invalid reconcile_interval"),
        (&["--stale-grace", "99999999999"], "invalid stale_grace"),
        (
            &["--block-idle-grace", "99999999999"],
            "invalid block_idle_grace",
        ),
        (&["--mtu", "67"], "invalid mtu"),
        (&["--log-level", "verbose"], "invalid log_level"),
        (&["--metrics-addr", "nowhere"], "invalid metrics_addr"),
    ];
    for (args, want) in flag_rows {
        let argv = std::iter::once(&"ipamd").chain(args.iter());
        let msg = err_text(Config::merge(
            Cli::try_parse_from(argv).unwrap(),
            FileConfig::default(),
            node,
        ));
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
    // A mistyped flag value is clap's to refuse, naming the flag.
    for flag in ["--mtu", "--block-size", "--cooldown"] {
        let e = Cli::try_parse_from(["ipamd", flag, "big"]).unwrap_err();
        assert!(e.to_string().contains(flag), "{e}");
    }
}

#[test]
fn levels_and_filters_that_are_fine() {
    for level in [
        "off",
        "DEBUG",
        "ipamd=trace,sled=info",
        "warn,ipamd[span]=debug",
    ] {
        let cli = Cli::try_parse_from(["ipamd", "--log-level", level]).unwrap();
        let r = Config::merge(cli, FileConfig::default(), node);
        assert!(r.is_ok(), "{level}: {r:?}");
    }
}

#[test]
fn bare_levels_keep_libraries_quiet() {
    let with = |level: &str| {
        let cli = Cli::try_parse_from(["ipamd", "--log-level", level]).unwrap();
        Config::merge(cli, FileConfig::default(), node)
            .unwrap()
            .log_filter()
    };
    assert_eq!(with("debug"), "info,ipamd=debug,ferry_proto=debug");
    assert_eq!(with("warn"), "warn,ipamd=warn,ferry_proto=warn");
    assert_eq!(with("sled=debug,ipamd=trace"), "sled=debug,ipamd=trace");
}

#[test]
fn metrics_addr_flag_file_empty_and_errors() {
    let with = |args: &[&str], toml: &str| {
        let mut argv = vec!["ipamd"];
        argv.extend_from_slice(args);
        Config::merge(Cli::try_parse_from(argv).unwrap(), parse(toml), node)
    };
    let addr = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
    assert_eq!(
        with(&[], "metrics_addr = \"0.0.0.0:9100\"")
            .unwrap()
            .metrics_addr,
        addr("0.0.0.0:9100")
    );
    assert_eq!(
        with(
            &["--metrics-addr", "127.0.0.1:9200"],
            "metrics_addr = \"0.0.0.0:9100\""
        )
        .unwrap()
        .metrics_addr,
        addr("127.0.0.1:9200")
    );
    assert_eq!(
        with(&["--metrics-addr", "[::1]:9641"], "")
            .unwrap()
            .metrics_addr,
        addr("[::1]:9641")
    );
    // Empty disables, from either source; the flag's "" beats the file.
    assert_eq!(
        with(&["--metrics-addr", ""], "").unwrap().metrics_addr,
        None
    );
    assert_eq!(with(&[], "metrics_addr = \"\"").unwrap().metrics_addr, None);
    assert_eq!(
        with(&["--metrics-addr", ""], "metrics_addr = \"127.0.0.1:1\"")
            .unwrap()
            .metrics_addr,
        None
    );
    for bad in [
        "9641",
        "localhost:9641",
        "127.0.0.1",
        "127.0.0.1:0",
        "1.2.3.4:99999",
    ] {
        let msg = err_text(with(&["--metrics-addr", bad], ""));
        assert!(msg.contains("metrics_addr"), "{bad}: {msg}");
    }
}

#[test]
fn other_checks() {
    let cli = Cli::try_parse_from(["ipamd", "--mtu", "60"]).unwrap();
    assert!(err_text(Config::merge(cli, FileConfig::default(), node)).contains("mtu"));
    let cli = Cli::try_parse_from(["ipamd", "--reconcile-interval", "0"]).unwrap();
    assert!(
        err_text(Config::merge(cli, FileConfig::default(), node)).contains("reconcile_interval")
    );
    let cli = Cli::try_parse_from(["ipamd", "--log-level", "lo[ud"]).unwrap();
    assert!(err_text(Config::merge(cli, FileConfig::default(), node)).contains("log_level"));
    assert!(
        err_text(Config::merge(Cli::default(), FileConfig::default(), || {
            None
        }))
        .contains("node_name")
    );
    let cli = Cli::try_parse_from(["ipamd", "--mtu", "1450"]).unwrap();
    assert_eq!(
        Config::merge(cli, FileConfig::default(), node).unwrap().mtu,
        Some(1450)
    );
}
