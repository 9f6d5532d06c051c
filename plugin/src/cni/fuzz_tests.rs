//! Fuzzing the plugin's front door: CNI_* environment + stdin -> [`Request`]
//! or [`CniError`].
//!
//! Two properties, over random inputs and over valid requests (every verb,
//! every cniVersion) mutated at the JSON, byte and environment level:
//! - parsing never panics;
//! - a rejection is a CNI error whose JSON (as `main` prints it) carries a
//!   cniVersion, a spec code (1-7, 11) or a documented ferry code (100-107),
//!   and a non-empty msg;
//! - an acceptance holds up: the verb is CNI_COMMAND's, the version gates
//!   hold, the container ID and ifname are valid, every config value is in
//!   its range (DEL may go on despite a bad `mtu` or `logLevel`), and the
//!   key, pod info, host veth name and prevResult can be derived without a
//!   panic.
//!
//! 40,000 mutated + 20,000 random cases (see `ipamd/src/grpc/fuzz_tests.rs`
//! for the rest of the 100,000).

use std::cell::RefCell;
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

use super::config::{
    MAX_MTU, MAX_SOCKET_PATH, MAX_TIMEOUT_MS, MIN_MTU, NetConf, log_directive,
    prev_result_addresses,
};
use super::error::CniError;
use super::request::{Request, error_version, parse};
use super::version::CniVersion;

const MUTATED_CASES: u32 = 40_000;
const RANDOM_CASES: u32 = 20_000;

const VERBS: [&str; 6] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"];
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];
const CONTAINER_ID: &str = "0f3c9a5e21b84d7f9e6a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4";

/// Strings that have broken parsers before: bad addresses and prefixes,
/// version look-alikes, names with forbidden characters, CNI_ARGS oddities.
const NASTY: &[&str] = &[
    "",
    " ",
    "\0",
    "\t\n",
    "null",
    "{}",
    "[]",
    "10.244.0.5",
    "10.244.0.5/32",
    "10.244.0.5/33",
    "10.244.0.5/-1",
    "10.244.0.5/",
    "/24",
    "10.244.0",
    "10.244.0.256",
    "300.1.1.1",
    "1.2.3.4.5",
    "0.0.0.0",
    "255.255.255.255",
    "::1",
    "fd00::5/64",
    "::ffff:10.0.0.1",
    "a.b.c.d",
    "10.0.0.1 ",
    " 10.0.0.1",
    "10.0.0.0/8",
    "0.3.0",
    "0.4.0",
    "1.1.0",
    "1.2.0",
    "0.1.0",
    "2.0.0",
    "1.0",
    "v1.0.0",
    "1.0.0\0",
    "ADD",
    "add",
    "DEL ",
    "VERSION",
    "eth0",
    ".",
    "..",
    "eth0:1",
    "eth%d",
    "%",
    "a/b",
    "eth 0",
    "0123456789abcdef",
    "ééééééé",
    "-abc",
    "_x",
    "ferry",
    "bad name",
    "verbose",
    "debgu",
    "DEBUG",
    "ferry=debug,h2=info",
    "ferry=loud",
    "warn,",
    "ipamd.sock",
    "/proc/self/ns/net",
    "IgnoreUnknown=1",
    "IgnoreUnknown=true;FOO=bar",
    "IgnoreUnknown=0;FOO=bar",
    "IgnoreUnknown=maybe;FOO=bar",
    "FOO=bar",
    "=",
    "==",
    ";;;",
    "a=b=c",
    "novalue",
    "IP=",
    "IP=,,,",
    "IP=10.0.0.1,,10.0.0.2",
    "IP=10.0.0.1/99",
    "IP=::1",
    "IP=banana",
    "K8S_POD_NAME=",
    "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u;IP=10.244.0.9/24",
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=\u{1F600};K8S_POD_NAME=\0",
    "/run/netns/does-not-exist",
    "relative/netns",
    "/",
];

type Env = BTreeMap<String, String>;

fn env_of(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A prevResult as a runtime would pass it, in `version`'s format.
fn prev_result(version: &str) -> Value {
    let mut ip = json!({"address": "10.244.0.9/32", "gateway": "169.254.1.1", "interface": 1});
    if version.starts_with('0') {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "fry1234567890a", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/run/netns/p1"}
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {}
    })
}

/// A valid request for `verb` in `version`, as a runtime sends it.
fn seed(verb: &str, version: &str) -> (Env, Value) {
    let mut conf = json!({
        "cniVersion": version,
        "name": "ferry",
        "type": "ferry",
        "ipamd": {"socket": "/run/ferry/ipamd.sock", "timeoutMs": 5000},
        "mtu": 0,
        "logFile": "",
        "logLevel": "info"
    });
    let env = match verb {
        "ADD" | "DEL" | "CHECK" => env_of(&[
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", CONTAINER_ID),
            ("CNI_NETNS", "/run/netns/p1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                 K8S_POD_INFRA_CONTAINER_ID=sandbox;K8S_POD_UID=u-1",
            ),
        ]),
        _ => env_of(&[("CNI_COMMAND", verb), ("CNI_PATH", "/opt/cni/bin")]),
    };
    match verb {
        "ADD" => {
            conf["args"] = json!({"cni": {"ips": ["10.244.0.9/24"]}});
            conf["runtimeConfig"] = json!({
                "ips": ["10.244.0.9"],
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                "io.kubernetes.cri.pod-annotations": {"ferry.dev/pool": "blue"}
            });
        }
        "DEL" | "CHECK" => conf["prevResult"] = prev_result(version),
        "GC" => {
            conf["cni.dev/valid-attachments"] =
                json!([{"containerID": CONTAINER_ID, "ifname": "eth0"}]);
        }
        _ => {}
    }
    (env, conf)
}

/// Where a JSON mutation lands: every field ferry reads, and some it does not.
const PATHS: &[&[&str]] = &[
    &["cniVersion"],
    &["name"],
    &["type"],
    &["ipamd"],
    &["ipamd", "socket"],
    &["ipamd", "timeoutMs"],
    &["mtu"],
    &["logFile"],
    &["logLevel"],
    &["args"],
    &["args", "cni"],
    &["args", "cni", "ips"],
    &["args", "cni", "ips", "0"],
    &["runtimeConfig"],
    &["runtimeConfig", "ips"],
    &["runtimeConfig", "ips", "0"],
    &["runtimeConfig", "portMappings"],
    &["runtimeConfig", "io.kubernetes.cri.pod-annotations"],
    &[
        "runtimeConfig",
        "io.kubernetes.cri.pod-annotations",
        "ferry.dev/pool",
    ],
    &["prevResult"],
    &["prevResult", "cniVersion"],
    &["prevResult", "ip4"],
    &["prevResult", "ip4", "ip"],
    &["prevResult", "ips"],
    &["prevResult", "ips", "0"],
    &["prevResult", "ips", "0", "address"],
    &["prevResult", "ips", "0", "interface"],
    &["prevResult", "ips", "0", "gateway"],
    &["prevResult", "interfaces"],
    &["prevResult", "interfaces", "1", "name"],
    &["cni.dev/valid-attachments"],
    &["cni.dev/valid-attachments", "0"],
    &["cni.dev/valid-attachments", "0", "containerID"],
    &["cni.dev/valid-attachments", "0", "ifname"],
    &["capabilities"],
    &["unknownField"],
];

#[derive(Debug, Clone)]
enum Mutation {
    SetJson(&'static [&'static str], Value),
    RemoveJson(&'static [&'static str]),
    SetEnv(String, String),
    DropEnv(String),
    FlipBit(Index, u8),
    DeleteBytes(Index, usize),
    InsertBytes(Index, Vec<u8>),
    Truncate(Index),
    DuplicateBytes(Index, usize),
    ReplaceStdin(Vec<u8>),
}

fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(NASTY).prop_map(str::to_string),
        4 => "\\PC{0,24}",
        2 => any::<String>(),
        1 => (1usize..100_000, prop::sample::select(vec!["x", "é", "\0", ";", "=", "9", "/"]))
            .prop_map(|(n, s)| s.repeat(n)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            0i64,
            -1,
            1,
            67,
            68,
            1500,
            65535,
            65536,
            600_000,
            600_001,
            i64::MAX,
            i64::MIN
        ])
        .prop_map(Value::from),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(nasty_string(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn env_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(CNI_VARS.to_vec()).prop_map(str::to_string),
        1 => "[A-Z_]{1,12}",
    ]
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::sample::select(VERBS.to_vec()).prop_map(str::to_string),
        6 => nasty_string(),
    ]
}

/// Garbage a runtime (or an attacker) might put on stdin.
fn raw_stdin() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..256),
        4 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => (1usize..20_000, prop::sample::select(vec!["[", "{\"a\":", "\"", "{", "0"]))
            .prop_map(|(n, s)| s.repeat(n).into_bytes()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let path = prop::sample::select(PATHS);
    prop_oneof![
        6 => (path.clone(), json_value()).prop_map(|(p, v)| Mutation::SetJson(p, v)),
        2 => path.prop_map(Mutation::RemoveJson),
        4 => (env_name(), env_value()).prop_map(|(k, v)| Mutation::SetEnv(k, v)),
        2 => env_name().prop_map(Mutation::DropEnv),
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::DeleteBytes(i, n)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::DuplicateBytes(i, n)),
        1 => raw_stdin().prop_map(Mutation::ReplaceStdin),
    ]
}

/// The value `parents` lead to in `v`, `None` where they run into a scalar
/// or a missing index; missing object keys are created when `create`.
fn walk<'a>(v: &'a mut Value, parents: &[&str], create: bool) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in parents {
        cur = match cur {
            Value::Object(m) => {
                if create {
                    m.entry(seg.to_string()).or_insert_with(|| json!({}))
                } else {
                    m.get_mut(*seg)?
                }
            }
            Value::Array(a) => a.get_mut(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Sets `path` in `v`, creating objects on the way; a no-op where the path
/// runs into a scalar.
fn set_path(v: &mut Value, path: &[&str], new: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    match walk(v, parents, true) {
        Some(Value::Object(m)) => {
            m.insert(last.to_string(), new);
        }
        Some(Value::Array(a)) => {
            if let Some(x) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *x = new;
            }
        }
        _ => {}
    }
}

fn remove_path(v: &mut Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    match walk(v, parents, false) {
        Some(Value::Object(m)) => {
            m.remove(*last);
        }
        Some(Value::Array(a)) => {
            if let Some(i) = last.parse::<usize>().ok().filter(|&i| i < a.len()) {
                a.remove(i);
            }
        }
        _ => {}
    }
}

/// The seed with its mutations applied: JSON ones first, then the stdin
/// bytes, and the environment.
fn mutate(mut env: Env, mut conf: Value, muts: &[Mutation]) -> (Env, Vec<u8>) {
    for m in muts {
        match m {
            Mutation::SetJson(p, v) => set_path(&mut conf, p, v.clone()),
            Mutation::RemoveJson(p) => remove_path(&mut conf, p),
            _ => {}
        }
    }
    let mut stdin = conf.to_string().into_bytes();
    for m in muts {
        let len = stdin.len();
        match m {
            Mutation::SetEnv(k, v) => {
                env.insert(k.clone(), v.clone());
            }
            Mutation::DropEnv(k) => {
                env.remove(k);
            }
            Mutation::FlipBit(i, bit) if len > 0 => stdin[i.index(len)] ^= 1 << bit,
            Mutation::DeleteBytes(i, n) if len > 0 => {
                let at = i.index(len);
                stdin.drain(at..(at + n).min(len));
            }
            Mutation::InsertBytes(i, bytes) => {
                let at = i.index(len + 1);
                stdin.splice(at..at, bytes.iter().copied());
            }
            Mutation::Truncate(i) => stdin.truncate(i.index(len + 1)),
            Mutation::DuplicateBytes(i, n) if len > 0 => {
                let at = i.index(len);
                let chunk: Vec<u8> = stdin[at..(at + n).min(len)].to_vec();
                stdin.splice(at..at, chunk);
            }
            Mutation::ReplaceStdin(b) => stdin = b.clone(),
            _ => {}
        }
    }
    (env, stdin)
}

fn allowed_code(code: u32) -> bool {
    // Spec codes, then ferry's own (`code` in error.rs).
    matches!(code, 1..=7 | 11 | 100..=107)
}

/// What `main` prints for a rejection must be a well-formed CNI error.
fn check_rejection(e: &CniError, stdin: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(allowed_code(e.code), "undocumented code {}: {e:?}", e.code);
    prop_assert!(!e.msg.trim().is_empty(), "empty msg: {e:?}");
    let printed = e.to_json(&error_version(stdin));
    let v: Value = serde_json::from_str(&printed)
        .map_err(|err| TestCaseError::fail(format!("error is not JSON ({err}): {printed}")))?;
    prop_assert!(
        v["cniVersion"].as_str().is_some_and(|s| !s.is_empty()),
        "no cniVersion: {printed}"
    );
    prop_assert_eq!(v["code"].as_u64(), Some(u64::from(e.code)));
    prop_assert!(
        v["msg"].as_str().is_some_and(|s| !s.trim().is_empty()),
        "no msg: {}",
        printed
    );
    Ok(())
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// stdin's cniVersion, for requests that do not keep it (STATUS, GC).
fn stdin_version(stdin: &[u8]) -> Option<CniVersion> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(v.get("cniVersion")?.as_str()?)
}

/// The config values every verb uses, in range.
fn check_ipamd_conf(conf: &NetConf) -> Result<(), TestCaseError> {
    prop_assert!((1..=MAX_TIMEOUT_MS).contains(&conf.ipamd.timeout_ms));
    let socket = conf.ipamd.socket.as_os_str().len();
    prop_assert!(conf.ipamd.socket.is_absolute() && socket <= MAX_SOCKET_PATH);
    Ok(())
}

/// `mtu` and `logLevel`, in range.
fn check_tunables(conf: &NetConf) -> Result<(), TestCaseError> {
    prop_assert!(conf.mtu == 0 || (MIN_MTU..=MAX_MTU).contains(&conf.mtu));
    prop_assert!(
        log_directive(&conf.log_level).is_ok(),
        "{:?}",
        conf.log_level
    );
    Ok(())
}

/// An accepted request must be one the verbs can act on safely.
fn check_acceptance(req: &Request, env: &Env, stdin: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        Some(req.verb_name()),
        env.get("CNI_COMMAND").map(String::as_str)
    );
    match req {
        Request::Version { .. } => {}
        Request::Add(a) | Request::Del(a) | Request::Check(a) => {
            prop_assert!(valid_name(&a.container_id), "{:?}", a.container_id);
            prop_assert!(
                !a.ifname.is_empty() && a.ifname.len() <= 15,
                "{:?}",
                a.ifname
            );
            prop_assert!(a.ifname != "." && a.ifname != "..");
            prop_assert!(
                !a.ifname
                    .chars()
                    .any(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace()),
                "{:?}",
                a.ifname
            );
            prop_assert!(valid_name(&a.conf.name), "{:?}", a.conf.name);
            check_ipamd_conf(&a.conf)?;
            if matches!(req, Request::Del(_)) {
                let tolerated = check_tunables(&a.conf).is_err();
                prop_assert!(!tolerated || !a.tolerated.is_empty());
            } else {
                check_tunables(&a.conf)?;
                prop_assert!(a.tolerated.is_empty());
            }
            prop_assert_eq!(stdin_version(stdin), Some(a.version));
            if matches!(req, Request::Check(_)) {
                prop_assert!(a.version.has_check());
            }
            if !matches!(req, Request::Add(_)) {
                prop_assert!(a.requested_ips.is_empty() && a.pool_hint.is_none());
            }
            let key = a.key();
            prop_assert_eq!(&key.container_id, &a.container_id);
            let _ = a.pod_info();
            let veth = a.host_veth();
            prop_assert!(veth.starts_with("fry") && veth.len() <= 15, "{}", veth);
            if let Some(prev) = &a.conf.prev_result {
                // CHECK reads it; whatever it holds, reading must not panic.
                let _ = prev_result_addresses(prev, &a.ifname);
            }
        }
        Request::Status(s) => {
            prop_assert!(valid_name(&s.conf.name));
            check_ipamd_conf(&s.conf)?;
            check_tunables(&s.conf)?;
            prop_assert_eq!(stdin_version(stdin), Some(CniVersion::V1_1_0));
        }
        Request::Gc(g) => {
            prop_assert!(valid_name(&g.conf.name));
            check_ipamd_conf(&g.conf)?;
            prop_assert_eq!(check_tunables(&g.conf).is_err(), !g.tolerated.is_empty());
            prop_assert_eq!(stdin_version(stdin), Some(CniVersion::V1_1_0));
            prop_assert_eq!(Some(&g.valid), g.conf.valid_attachments.as_ref());
        }
    }
    Ok(())
}

/// Parses one input and checks it; returns what happened ("ok" or the code).
fn check_input(env: &Env, stdin: &[u8]) -> Result<String, TestCaseError> {
    match parse(|k| env.get(k).cloned(), stdin) {
        Ok(req) => check_acceptance(&req, env, stdin).map(|()| match &req {
            Request::Del(a) if !a.tolerated.is_empty() => "DEL ok despite".to_string(),
            _ => format!("{} ok", req.verb_name()),
        }),
        Err(e) => check_rejection(&e, stdin).map(|()| format!("code {}", e.code)),
    }
}

/// Runs `cases` inputs from `strategy`, then makes sure the run reached
/// every outcome in `expect` (a generator stuck on one error tests little).
fn run<S: Strategy>(
    cases: u32,
    strategy: S,
    input: impl Fn(S::Value) -> (Env, Vec<u8>),
    expect: &[&str],
) {
    let config = ProptestConfig {
        cases,
        // Failures print the minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let tally: RefCell<BTreeMap<String, u32>> = RefCell::default();
    let result = TestRunner::new(config).run(&strategy, |v| {
        let (env, stdin) = input(v);
        let outcome = check_input(&env, &stdin)?;
        *tally.borrow_mut().entry(outcome).or_default() += 1;
        Ok(())
    });
    let tally = tally.into_inner();
    eprintln!("{tally:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(tally.values().sum::<u32>() >= cases);
    for want in expect {
        assert!(tally.contains_key(*want), "never saw {want:?}: {tally:#?}");
    }
}

/// The seeds themselves: every verb in every version is accepted, except
/// where the spec's version gates say code 1.
#[test]
fn unmutated_seeds_parse_as_the_spec_says() {
    for verb in VERBS {
        for version in VERSIONS {
            let (env, conf) = seed(verb, version);
            let stdin = conf.to_string().into_bytes();
            let v = CniVersion::parse(version).unwrap();
            let gated = match verb {
                "CHECK" => !v.has_check(),
                "STATUS" | "GC" => !v.has_status_and_gc(),
                _ => false,
            };
            match parse(|k| env.get(k).cloned(), &stdin) {
                Ok(req) => {
                    assert!(!gated, "{verb} {version} should be refused with code 1");
                    assert_eq!(req.verb_name(), verb);
                    check_acceptance(&req, &env, &stdin).unwrap();
                }
                Err(e) => {
                    assert!(gated, "{verb} {version} refused: {e:?}");
                    assert_eq!(e.code, 1, "{verb} {version}");
                    check_rejection(&e, &stdin).unwrap();
                }
            }
        }
    }
}

#[test]
fn mutated_requests_parse_or_fail_the_cni_way() {
    let strategy = (
        prop::sample::select(VERBS.to_vec()),
        prop::sample::select(VERSIONS.to_vec()),
        prop::collection::vec(mutation(), 0..5),
    );
    run(
        MUTATED_CASES,
        strategy,
        |(verb, version, muts)| {
            let (env, conf) = seed(verb, version);
            mutate(env, conf, &muts)
        },
        &[
            "ADD ok",
            "DEL ok",
            "DEL ok despite",
            "CHECK ok",
            "STATUS ok",
            "GC ok",
            "VERSION ok",
            "code 1",
            "code 4",
            "code 6",
            "code 7",
        ],
    );
}

/// A random environment, usually with each CNI_* variable set, to a
/// plausible value more often than not, so that stdin gets looked at.
fn random_env() -> impl Strategy<Value = Env> {
    let var = |good: Vec<&'static str>| {
        prop::option::weighted(
            0.9,
            prop_oneof![
                3 => prop::sample::select(good).prop_map(str::to_string),
                1 => nasty_string(),
            ],
        )
    };
    (
        prop::collection::btree_map(env_name(), env_value(), 0..3),
        var(VERBS.to_vec()),
        var(vec![CONTAINER_ID, "c1"]),
        var(vec!["/run/netns/p1", ""]),
        var(vec!["eth0", "net1"]),
        var(vec!["IgnoreUnknown=1;K8S_POD_NAME=p", ""]),
    )
        .prop_map(|(mut env, cmd, cid, netns, ifname, args)| {
            for (k, v) in CNI_VARS.iter().zip([cmd, cid, netns, ifname, args]) {
                if let Some(v) = v {
                    env.insert(k.to_string(), v);
                }
            }
            env
        })
}

/// A random config object: a cniVersion and name, and random values under
/// the keys ferry reads.
fn random_conf() -> impl Strategy<Value = Vec<u8>> {
    let keys = vec![
        "cniVersion",
        "name",
        "type",
        "ipamd",
        "mtu",
        "logFile",
        "logLevel",
        "args",
        "runtimeConfig",
        "prevResult",
        "cni.dev/valid-attachments",
    ];
    let mut versions = VERSIONS.to_vec();
    versions.push("0.2.0");
    (
        prop::sample::select(versions),
        prop::collection::btree_map(prop::sample::select(keys), json_value(), 0..4),
    )
        .prop_map(|(version, fields)| {
            let mut conf = json!({"cniVersion": version, "name": "ferry"});
            for (k, v) in fields {
                conf[k] = v;
            }
            conf.to_string().into_bytes()
        })
}

#[test]
fn random_requests_parse_or_fail_the_cni_way() {
    let stdin = prop_oneof![2 => raw_stdin(), 1 => random_conf()];
    run(
        RANDOM_CASES,
        (random_env(), stdin),
        |input| input,
        &["code 1", "code 4", "code 6", "code 7", "VERSION ok"],
    );
}
