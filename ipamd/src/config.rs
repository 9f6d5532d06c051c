//! ipamd's configuration: command-line flags merged over an optional TOML
//! file merged over defaults (flag > file > default), then validated into
//! [`Config`]. Errors name the offending key so an operator can fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::alloc::pool::MIN_BLOCK_PREFIX;
use crate::ipam::IpamOptions;
use crate::model::{DEFAULT_POOL, PoolSpec};

/// The longest cooldown, interval or grace period accepted.
const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);
/// `sun_path` holds 108 bytes, the last one a NUL.
const MAX_SOCKET_PATH: usize = 107;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";
pub const DEFAULT_POD_CIDR: &str = "10.244.0.0/16";
pub const DEFAULT_BLOCK_SIZE: u8 = 26;
pub const DEFAULT_COOLDOWN_SECS: u64 = 30;
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 60;
pub const DEFAULT_STALE_GRACE_SECS: u64 = 300;
pub const DEFAULT_BLOCK_IDLE_GRACE_SECS: u64 = 600;
/// A runtime may list valid attachments before an ADD and send GC after it.
pub const DEFAULT_GC_MIN_AGE_SECS: u64 = 10;
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Loopback only: metrics are for a node-local scraper unless the operator
/// says otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9641";

/// The ipamd command line. Every flag is optional here so that a flag the
/// operator did not give can fall back to the file, then to the default.
#[derive(Debug, Default, Clone, Parser)]
#[command(name = "ipamd", version, about = "ferry's per-node IPAM daemon")]
pub struct Cli {
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve gRPC on [default: /run/ferry/ipamd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory; the sled database lives in DIR/db [default: /var/lib/ferry].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// This node's name [default: the hostname].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// CIDR of the default pool [default: 10.244.0.0/16].
    #[arg(long, value_name = "CIDR")]
    pub pod_cidr: Option<String>,
    /// Prefix length of the per-node blocks [default: 26].
    #[arg(long, value_name = "N")]
    pub block_size: Option<u8>,
    /// Seconds a freed address waits before reuse [default: 30].
    #[arg(long, value_name = "SECS")]
    pub cooldown: Option<u64>,
    /// Seconds between reconcile passes [default: 60].
    #[arg(long, value_name = "SECS")]
    pub reconcile_interval: Option<u64>,
    /// Seconds between the two looks before reconcile releases an address [default: 300].
    #[arg(long, value_name = "SECS")]
    pub stale_grace: Option<u64>,
    /// Seconds a block must sit empty before it is given back [default: 600].
    #[arg(long, value_name = "SECS")]
    pub block_idle_grace: Option<u64>,
    /// CNI GC spares allocations created or used within this many seconds
    /// [default: 10].
    #[arg(long, value_name = "SECS")]
    pub gc_min_age: Option<u64>,
    /// Pod MTU; 0 = auto (underlay MTU - 20 for IPIP) [default: 0].
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,
    /// tracing level or filter directive [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Address for the Prometheus endpoint GET /metrics; "" disables it
    /// [default: 127.0.0.1:9641].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<String>,
}

/// The TOML file. Unknown keys are rejected so that a typo is not silently
/// ignored.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub node_name: Option<String>,
    pub pod_cidr: Option<String>,
    pub block_size: Option<u8>,
    pub cooldown: Option<u64>,
    pub reconcile_interval: Option<u64>,
    pub stale_grace: Option<u64>,
    pub block_idle_grace: Option<u64>,
    pub gc_min_age: Option<u64>,
    pub mtu: Option<u32>,
    pub log_level: Option<String>,
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub pools: Vec<FilePool>,
}

/// One `[[pools]]` table: a namespace pool besides the default one.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub name: String,
    pub cidr: String,
    /// Defaults to the global block_size.
    pub block_size: Option<u8>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub nat_outgoing: bool,
    pub snat_address: Option<String>,
    #[serde(default)]
    pub isolated: bool,
    #[serde(default)]
    pub allow_from: Vec<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub block_size: u8,
    pub cooldown: Duration,
    pub reconcile_interval: Duration,
    pub stale_grace: Duration,
    pub block_idle_grace: Duration,
    pub gc_min_age: Duration,
    /// None = detect from the underlay.
    pub mtu: Option<u32>,
    pub log_level: String,
    /// Where GET /metrics is served; None = disabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Every pool, the default one (from pod_cidr) first.
    pub pools: Vec<PoolSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads the file named by `--config` (if any), merges and validates.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file, hostname)
    }

    /// flag > file > default. `default_node` is only called when neither
    /// gives a node name.
    pub fn merge(
        cli: Cli,
        file: FileConfig,
        default_node: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let socket = cli
            .socket
            .or(file.socket)
            .unwrap_or_else(|| PathBuf::from(ferry_proto::DEFAULT_SOCKET));
        check_absolute("socket", &socket)?;
        let socket_len = socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket",
                format!(
                    "{} is {socket_len} bytes long; a Unix socket path holds at most \
                     {MAX_SOCKET_PATH}",
                    socket.display()
                ),
            ));
        }
        let state_dir = cli
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        check_absolute("state_dir", &state_dir)?;

        let node_name = match cli.node_name.or(file.node_name) {
            Some(name) => name,
            None => default_node()
                .ok_or_else(|| invalid("node_name", "not set and the hostname is unavailable"))?,
        };
        let node_name = node_name.trim().to_string();
        if node_name.is_empty() {
            return Err(invalid("node_name", "must not be empty"));
        }

        let pod_cidr_text = cli
            .pod_cidr
            .or(file.pod_cidr)
            .unwrap_or_else(|| DEFAULT_POD_CIDR.to_string());
        let pod_cidr = parse_network("pod_cidr", &pod_cidr_text)?;
        let block_size = cli
            .block_size
            .or(file.block_size)
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        check_block_size("block_size", pod_cidr, block_size)?;

        let secs = |flag: Option<u64>, file: Option<u64>, default: u64| {
            Duration::from_secs(flag.or(file).unwrap_or(default))
        };
        // Timers add these to Instant::now(), which panics on overflow.
        let at_most_a_year = |key: &str, d: Duration| {
            if d > MAX_PERIOD {
                Err(invalid(
                    key,
                    format!("{} s is more than a year", d.as_secs()),
                ))
            } else {
                Ok(d)
            }
        };
        let cooldown = at_most_a_year(
            "cooldown",
            secs(cli.cooldown, file.cooldown, DEFAULT_COOLDOWN_SECS),
        )?;
        let reconcile_interval = at_most_a_year(
            "reconcile_interval",
            secs(
                cli.reconcile_interval,
                file.reconcile_interval,
                DEFAULT_RECONCILE_INTERVAL_SECS,
            ),
        )?;
        if reconcile_interval.is_zero() {
            return Err(invalid("reconcile_interval", "must be at least 1 second"));
        }
        let stale_grace = at_most_a_year(
            "stale_grace",
            secs(cli.stale_grace, file.stale_grace, DEFAULT_STALE_GRACE_SECS),
        )?;
        let block_idle_grace = at_most_a_year(
            "block_idle_grace",
            secs(
                cli.block_idle_grace,
                file.block_idle_grace,
                DEFAULT_BLOCK_IDLE_GRACE_SECS,
            ),
        )?;
        let gc_min_age = at_most_a_year(
            "gc_min_age",
            secs(cli.gc_min_age, file.gc_min_age, DEFAULT_GC_MIN_AGE_SECS),
        )?;

        let mtu = match cli.mtu.or(file.mtu).unwrap_or(0) {
            0 => None,
            // The IPv4 range, as the plugin checks its own `mtu`.
            m if (68..=65535).contains(&m) => Some(m),
            m => {
                return Err(invalid(
                    "mtu",
                    format!("{m} is out of range (0 = auto, else 68..=65535)"),
                ));
            }
        };

        let log_level = cli
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
        check_log_level(&log_level)?;

        let metrics_addr = parse_metrics_addr(
            &cli.metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_string()),
        )?;

        let default_pool = PoolSpec::new(DEFAULT_POOL, pod_cidr, block_size, Vec::new());
        let mut pools = vec![default_pool];
        for (i, p) in file.pools.iter().enumerate() {
            pools.push(file_pool(i, p, block_size)?);
        }
        validate_pools(&pools)?;

        Ok(Config {
            socket,
            state_dir,
            node_name,
            pod_cidr,
            block_size,
            cooldown,
            reconcile_interval,
            stale_grace,
            block_idle_grace,
            gc_min_age,
            mtu,
            log_level,
            metrics_addr,
            pools,
        })
    }

    /// The tracing filter. A bare level applies to ferry's own code; its
    /// libraries stay at info at most (sled's debug output drowns
    /// everything). Anything else is taken as a full filter directive.
    pub fn log_filter(&self) -> String {
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let level = self.log_level.trim().to_ascii_lowercase();
        match LEVELS.iter().position(|l| *l == level) {
            Some(i) => {
                let deps = LEVELS[i.min(3)];
                format!("{deps},ipamd={level},ferry_proto={level},ipamctl={level}")
            }
            None => self.log_level.clone(),
        }
    }

    pub fn ipam_options(&self) -> IpamOptions {
        IpamOptions {
            node: self.node_name.clone(),
            pools: self.pools.clone(),
            cooldown: self.cooldown,
            block_idle_grace: self.block_idle_grace,
            gc_min_age: self.gc_min_age,
        }
    }
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    // A syntax error: toml's message shows the line.
    let de = toml::Deserializer::parse(text).map_err(|e| parse_error(e.to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // "." is the top level, where an unknown key is reported.
        let key = match e.path().to_string() {
            p if p == "." => String::new(),
            p => format!("{p}: "),
        };
        let inner = e.into_inner();
        let at = inner.span().map_or_else(String::new, |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        });
        parse_error(format!("{key}{}{at}", inner.message().trim_end()))
    })
}

fn check_absolute(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if !path.is_absolute() {
        // Relative to whatever directory ipamd happens to start in.
        return Err(invalid(
            key,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(invalid(key, "contains a NUL byte"));
    }
    Ok(())
}

/// A level, or a tracing filter whose bare words are all levels:
/// EnvFilter reads a bare word that is no level as a target name, so a typo
/// such as "debgu" would silently log nothing.
fn check_log_level(level: &str) -> Result<(), ConfigError> {
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    let bad = |why: String| Err(invalid("log_level", why));
    if level.trim().is_empty() {
        return bad(format!("must not be empty (one of {LEVELS}, or a filter)"));
    }
    for d in level.split(',').map(str::trim) {
        if !d.contains(['=', '['])
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return bad(format!("{d:?} in {level:?} is not a level ({LEVELS})"));
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
        return bad(format!(
            "{level:?} is not a level ({LEVELS}) or a tracing filter: {e}"
        ));
    }
    Ok(())
}

fn hostname() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?;
    let name = name.into_string().ok()?;
    (!name.is_empty()).then_some(name)
}

/// `IP:PORT` (`[v6]:PORT` for IPv6); empty means metrics are off.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = text.parse().map_err(|_| {
        invalid(
            "metrics_addr",
            format!("{text:?} is not IP:PORT (like {DEFAULT_METRICS_ADDR}); \"\" disables metrics"),
        )
    })?;
    if addr.port() == 0 {
        return Err(invalid(
            "metrics_addr",
            format!("{text:?}: port 0 would pick a random port no scraper can find"),
        ));
    }
    Ok(Some(addr))
}

/// A CIDR whose host bits are zero; naming the fix when they are not.
pub fn parse_network(key: &str, text: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an IPv4 CIDR (like 10.244.0.0/16)"),
        )
    })?;
    if net.trunc() != net {
        return Err(invalid(
            key,
            format!("{net} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

pub fn check_block_size(key: &str, cidr: Ipv4Net, block_size: u8) -> Result<(), ConfigError> {
    let lowest = cidr.prefix_len().max(MIN_BLOCK_PREFIX);
    if block_size < lowest || block_size > 32 {
        return Err(invalid(
            key,
            format!(
                "{block_size} must be between {lowest} (the pool's prefix length, and at most \
                 65536 addresses per block) and 32"
            ),
        ));
    }
    Ok(())
}

fn file_pool(i: usize, p: &FilePool, default_block: u8) -> Result<PoolSpec, ConfigError> {
    let key = |field: &str| format!("pools[{i}].{field}");
    let name = p.name.trim();
    if name.is_empty() {
        return Err(invalid(key("name"), "must not be empty"));
    }
    let cidr = parse_network(&key("cidr"), &p.cidr)?;
    let block_size = p.block_size.unwrap_or(default_block.max(cidr.prefix_len()));
    check_block_size(&key("block_size"), cidr, block_size)?;
    let snat_address =
        match p.snat_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(s.parse::<Ipv4Addr>().map_err(|_| {
                invalid(key("snat_address"), format!("{s:?} is not an IPv4 address"))
            })?),
        };
    Ok(PoolSpec {
        name: name.to_string(),
        cidr,
        block_size,
        namespaces: PoolSpec::trimmed_names(&p.namespaces),
        nat_outgoing: p.nat_outgoing,
        snat_address,
        isolated: p.isolated,
        allow_from: PoolSpec::trimmed_names(&p.allow_from),
        runtime: false,
    })
}

/// Checks a whole pool set: unique names, exactly one default, no
/// overlapping CIDRs, no namespace served twice, allow_from names known.
pub fn validate_pools(pools: &[PoolSpec]) -> Result<(), ConfigError> {
    let key = |i: usize, field: &str| {
        if pools[i].name == DEFAULT_POOL && i == 0 {
            // The default pool comes from top-level keys.
            match field {
                "cidr" => "pod_cidr".to_string(),
                other => other.to_string(),
            }
        } else {
            format!("pools[{}].{field}", i.saturating_sub(1))
        }
    };
    let mut names = BTreeSet::new();
    let mut namespaces: BTreeMap<&str, &str> = BTreeMap::new();
    let mut defaults = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        if !names.insert(p.name.as_str()) {
            return Err(invalid(
                key(i, "name"),
                format!("pool name {:?} is used twice", p.name),
            ));
        }
        if p.namespaces.is_empty() {
            defaults.push(i);
        }
        for ns in &p.namespaces {
            if ns.is_empty() {
                return Err(invalid(key(i, "namespaces"), "holds an empty name"));
            }
            if let Some(other) = namespaces.insert(ns, &p.name) {
                return Err(invalid(
                    key(i, "namespaces"),
                    format!(
                        "namespace {ns:?} is served by both pool {other:?} and pool {:?}",
                        p.name
                    ),
                ));
            }
        }
        for (j, q) in pools.iter().enumerate().take(i) {
            if p.cidr.contains(&q.cidr.network()) || q.cidr.contains(&p.cidr.network()) {
                return Err(invalid(
                    key(i, "cidr"),
                    format!(
                        "{} (pool {:?}) overlaps {} (pool {:?}, {})",
                        p.cidr,
                        p.name,
                        q.cidr,
                        q.name,
                        key(j, "cidr")
                    ),
                ));
            }
        }
    }
    if defaults.len() != 1 {
        let which: Vec<&str> = defaults.iter().map(|&i| pools[i].name.as_str()).collect();
        return Err(invalid(
            "pools",
            format!(
                "exactly one pool may serve no namespaces (the default, from pod_cidr); these do: {which:?}; give each [[pools]] entry namespaces"
            ),
        ));
    }
    for (i, p) in pools.iter().enumerate() {
        for from in &p.allow_from {
            if !names.contains(from.as_str()) {
                return Err(invalid(
                    key(i, "allow_from"),
                    format!("names unknown pool {from:?}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let cli = Cli::try_parse_from(["ipamd", "--pod-cidr", "10.0.0.0/8", "--block-size", "12"])
            .unwrap();
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
        assert_eq!(
            with("debug"),
            "info,ipamd=debug,ferry_proto=debug,ipamctl=debug"
        );
        assert_eq!(
            with("warn"),
            "warn,ipamd=warn,ferry_proto=warn,ipamctl=warn"
        );
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
            err_text(Config::merge(cli, FileConfig::default(), node))
                .contains("reconcile_interval")
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
}
