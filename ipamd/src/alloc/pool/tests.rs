use super::*;

fn pool(cidr: &str, block: u8) -> PoolSpec {
    PoolSpec::new("p", cidr.parse().unwrap(), block, vec![])
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sizes_exclude_network_and_broadcast() {
    let p = pool("10.0.0.0/27", 29);
    assert_eq!(pool_size(&p), 30);
    assert_eq!(usable_in(&p, "10.0.0.0/29".parse().unwrap()), 7);
    assert_eq!(usable_in(&p, "10.0.0.8/29".parse().unwrap()), 8);
    assert_eq!(usable_in(&p, "10.0.0.24/29".parse().unwrap()), 7);
    assert!(is_reserved(&p, "10.0.0.0".parse().unwrap()));
    assert!(is_reserved(&p, "10.0.0.31".parse().unwrap()));
    assert!(!is_reserved(&p, "10.0.0.1".parse().unwrap()));
    assert_eq!(pool_size(&pool("10.0.0.0/31", 31)), 2);
    assert_eq!(pool_size(&pool("10.0.0.7/32", 32)), 1);
}

#[test]
fn block_of_truncates_to_block_size() {
    let p = pool("10.0.0.0/27", 29);
    assert_eq!(
        block_of(&p, "10.0.0.13".parse().unwrap()),
        Some("10.0.0.8/29".parse().unwrap())
    );
    assert_eq!(block_of(&p, "10.0.1.13".parse().unwrap()), None);
}

#[test]
fn validate_rejects_bad_specs() {
    let msg = |p: &PoolSpec| validate(p).unwrap_err().to_string();
    assert!(validate(&pool("10.0.0.0/24", 26)).is_ok());
    assert!(msg(&pool("10.0.0.1/24", 26)).contains("host bits"));
    assert!(validate(&pool("10.0.0.0/24", 23)).is_err());
    assert!(msg(&pool("10.0.0.0/8", 8)).contains("between 16"));
    let mut p = pool("10.0.0.0/24", 26);
    p.name = " ".into();
    assert_eq!(msg(&p), "pool name must not be empty");
    p.name = "x".repeat(MAX_NAME_LEN + 1);
    assert!(msg(&p).contains("at most 63"));
    p.name = "a/b".into();
    assert_eq!(msg(&p), "pool name \"a/b\" must not contain '/' or NUL");
    let mut p = pool("10.0.0.0/24", 26);
    p.namespaces = vec!["n".repeat(MAX_NAME_LEN + 1)];
    assert!(msg(&p).contains("namespaces entry"));
    p.namespaces = names(&["a", ""]);
    assert_eq!(msg(&p), "pool p: namespaces holds an empty name");
    let mut p = pool("10.0.0.0/24", 26);
    p.allow_from = vec!["a".into(); MAX_NAMES + 1];
    assert!(msg(&p).contains("allow_from lists"));
}

#[test]
fn parse_trims_and_fills_in_the_block_size() {
    let ns = names(&[" team ", "b"]);
    let from = names(&[" default"]);
    let parts = PoolParts {
        name: " team-a ",
        cidr: " 10.9.0.0/28 ",
        namespaces: &ns,
        nat_outgoing: true,
        snat_address: Some(" 192.0.2.1 "),
        isolated: true,
        allow_from: &from,
        ..PoolParts::default()
    };
    let spec = parse(&parts, 26).unwrap();
    assert_eq!(spec.name, "team-a");
    assert_eq!(spec.cidr, "10.9.0.0/28".parse::<Ipv4Net>().unwrap());
    // The default block is larger than the pool: the pool's prefix.
    assert_eq!(spec.block_size, 28);
    assert_eq!(spec.namespaces, names(&["team", "b"]));
    assert_eq!(spec.allow_from, names(&["default"]));
    assert_eq!(spec.snat_address, Some(Ipv4Addr::new(192, 0, 2, 1)));
    assert!(spec.nat_outgoing && spec.isolated && !spec.runtime);
    let blank_snat = PoolParts {
        snat_address: Some(" "),
        block_size: Some(30),
        ..parts
    };
    let spec = parse(&blank_snat, 26).unwrap();
    assert_eq!((spec.snat_address, spec.block_size), (None, 30));
}

/// Each bad field is named, with a message that reads after the field's
/// key (config, gRPC) and one that reads alone (the core).
#[test]
fn parse_errors_name_the_field() {
    let ns = names(&["x"]);
    let ok = PoolParts {
        name: "x",
        cidr: "10.9.0.0/24",
        namespaces: &ns,
        ..PoolParts::default()
    };
    let long = "n".repeat(MAX_NAME_LEN + 1);
    let long_ns = vec![long.clone()];
    let rows: Vec<(PoolParts<'_>, PoolField, &str, &str)> = vec![
        (
            PoolParts { name: " ", ..ok },
            PoolField::Name,
            "must not be empty",
            "pool name must not be empty",
        ),
        (
            PoolParts { name: &long, ..ok },
            PoolField::Name,
            "\"nnnnnnnnnnnnnnnn\"... is 64 bytes long; at most 63 are allowed",
            "pool name \"nnnnnnnnnnnnnnnn\"... is 64 bytes long; at most 63 are allowed",
        ),
        (
            PoolParts {
                cidr: "bogus",
                ..ok
            },
            PoolField::Cidr,
            "\"bogus\" is not an IPv4 CIDR (like 10.244.0.0/16)",
            "pool x: cidr \"bogus\" is not an IPv4 CIDR (like 10.244.0.0/16)",
        ),
        (
            PoolParts {
                cidr: "10.9.0.1/24",
                ..ok
            },
            PoolField::Cidr,
            "10.9.0.1/24 has host bits set; did you mean 10.9.0.0/24?",
            "pool x: cidr 10.9.0.1/24 has host bits set; did you mean 10.9.0.0/24?",
        ),
        (
            PoolParts {
                block_size: Some(300),
                ..ok
            },
            PoolField::BlockSize,
            "300 must be between 24 (the pool's prefix length, and at most 65536 addresses per block) and 32",
            "pool x: block_size 300 must be between 24",
        ),
        (
            PoolParts {
                cidr: "10.0.0.0/8",
                block_size: Some(12),
                ..ok
            },
            PoolField::BlockSize,
            "12 must be between 16",
            "pool x: block_size 12",
        ),
        (
            PoolParts {
                snat_address: Some("nope"),
                ..ok
            },
            PoolField::SnatAddress,
            "\"nope\" is not an IPv4 address",
            "pool x: snat_address \"nope\"",
        ),
        (
            PoolParts {
                namespaces: &long_ns,
                ..ok
            },
            PoolField::Namespaces,
            "entry \"nnnnnnnnnnnnnnnn\"... is 64 bytes long",
            "pool x: namespaces entry",
        ),
    ];
    for (parts, field, detail, message) in rows {
        let e = parse(&parts, 26).unwrap_err();
        assert_eq!(e.field(), Some(field), "{e}");
        assert!(e.detail().starts_with(detail), "{field}: {}", e.detail());
        assert!(e.to_string().starts_with(message), "{field}: {e}");
    }
}

#[test]
fn sets_name_the_pool_at_fault() {
    let spec = |name: &str, cidr: &str, ns: &[&str]| {
        PoolSpec::new(name, cidr.parse().unwrap(), 28, names(ns))
    };
    let default = spec("default", "10.244.0.0/16", &[]);
    let err = |pools: &[PoolSpec]| validate_set(pools).unwrap_err();

    assert!(validate_set(&[default.clone(), spec("a", "10.9.0.0/24", &["a"])]).is_ok());
    let e = err(&[default.clone(), spec("default", "10.9.0.0/24", &["x"])]);
    assert_eq!((e.index, e.error.field()), (Some(1), Some(PoolField::Name)));
    assert_eq!(e.to_string(), "pool name \"default\" is used twice");

    let e = err(&[default.clone(), spec("x", "10.244.8.0/24", &["x"])]);
    assert_eq!((e.index, e.error.field()), (Some(1), Some(PoolField::Cidr)));
    assert_eq!(
        e.to_string(),
        "pool x (10.244.8.0/24) overlaps pool default (10.244.0.0/16)"
    );

    let e = err(&[default.clone(), spec("x", "10.9.0.0/24", &[])]);
    assert_eq!(e.index, Some(1));
    assert!(matches!(e.error, PoolError::SecondDefault { .. }), "{e}");

    let e = err(&[
        default.clone(),
        spec("x", "10.9.0.0/24", &["a", "b"]),
        spec("y", "10.8.0.0/24", &["b"]),
    ]);
    assert_eq!(
        (e.index, e.error.field()),
        (Some(2), Some(PoolField::Namespaces))
    );
    assert_eq!(
        e.to_string(),
        "namespace b is listed by both pool y and pool x"
    );

    let e = err(&[spec("x", "10.9.0.0/24", &["x"])]);
    assert_eq!((e.index, e.error.field()), (None, None));

    let mut ghost = spec("x", "10.9.0.0/24", &["x"]);
    ghost.allow_from = names(&["x", "default", "ghost"]);
    let e = err(&[default.clone(), ghost.clone()]);
    assert_eq!(
        (e.index, e.error.field()),
        (Some(1), Some(PoolField::AllowFrom))
    );
    assert_eq!(e.error.detail(), "names unknown pool \"ghost\"");
    assert_eq!(
        e.to_string(),
        "pool x: allow_from names unknown pool \"ghost\""
    );
    // Side by side only: a stored pool may name a pool that is gone.
    assert!(check_together(&[&default, &ghost]).is_ok());

    let mut bad = spec("x", "10.9.0.0/24", &["x"]);
    bad.namespaces.push(" ".into());
    assert_eq!(err(&[default, bad]).index, Some(1));
}
