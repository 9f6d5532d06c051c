use super::*;

fn client(socket: &str) -> GrpcIpam {
    GrpcIpam::new(Path::new(socket), Duration::from_millis(300)).unwrap()
}

#[test]
fn missing_socket_is_unreachable_naming_the_socket() {
    let c = client("/nonexistent/ferry-test/ipamd.sock");
    let key = Key {
        network: "n".into(),
        container_id: "c".into(),
        ifname: "eth0".into(),
    };
    let err = c.release(&key).unwrap_err();
    let IpamClientError::Unreachable(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("/nonexistent/ferry-test/ipamd.sock"), "{msg}");
    assert!(msg.starts_with("ipamd is not reachable at "), "{msg}");
}

#[test]
fn a_socket_nobody_listens_on_is_unreachable() {
    let dir = std::env::temp_dir().join(format!("ferry-grpc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dead.sock");
    let _ = std::fs::remove_file(&path);
    // Bound then dropped: the file stays, connect() gets ECONNREFUSED.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let c = GrpcIpam::new(&path, Duration::from_millis(300)).unwrap();
    let err = c.status().unwrap_err();
    assert!(
        matches!(err, IpamClientError::Unreachable(ref m) if m.contains("dead.sock")),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_codes_map_once() {
    let c = client("/x.sock");
    let cases = [
        (Status::resource_exhausted("full"), "Exhausted"),
        (Status::already_exists("taken"), "AddressUnavailable"),
        (Status::failed_precondition("0.1 vs 0.2"), "VersionMismatch"),
        (Status::invalid_argument("bad"), "InvalidRequest"),
        (Status::unavailable("etcd"), "Unavailable"),
        (Status::deadline_exceeded("slow"), "Unreachable"),
        (Status::internal("boom"), "Internal"),
        (Status::not_found("?"), "Internal"),
    ];
    for (status, want) in cases {
        let got = format!("{:?}", c.map_status(status));
        assert!(got.starts_with(want), "{got} vs {want}");
    }
}

#[test]
fn a_connection_broken_mid_call_is_unreachable_whatever_the_code() {
    let c = client("/x.sock");
    for code in [Code::Unknown, Code::Unavailable, Code::Internal] {
        let mut status = Status::new(code, "transport error");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        status.set_source(std::sync::Arc::new(reset));
        let got = c.map_status(status);
        assert!(
            matches!(got, IpamClientError::Unreachable(ref m) if m.contains("/x.sock")),
            "{code:?}: {got:?}"
        );
    }
}

#[test]
fn addresses_parse_with_or_without_prefix() {
    assert_eq!(
        parse_address("10.0.0.1").unwrap(),
        "10.0.0.1/32".parse::<Ipv4Net>().unwrap()
    );
    assert_eq!(
        parse_address("10.0.0.1/32").unwrap(),
        "10.0.0.1/32".parse::<Ipv4Net>().unwrap()
    );
    assert!(parse_address("nope").is_err());
}
