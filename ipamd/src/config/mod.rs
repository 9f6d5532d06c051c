//! ipamd's configuration: command-line flags merged over an optional TOML
//! file merged over defaults (flag > file > default), then validated into
//! [`Config`]. Errors name the offending key so an operator can fix it.

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::alloc::pool::{self, PoolError, PoolField, PoolParts};
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

impl FilePool {
    fn parts(&self) -> PoolParts<'_> {
        PoolParts {
            name: &self.name,
            cidr: &self.cidr,
            block_size: self.block_size.map(u32::from),
            namespaces: &self.namespaces,
            nat_outgoing: self.nat_outgoing,
            snat_address: self.snat_address.as_deref(),
            isolated: self.isolated,
            allow_from: &self.allow_from,
        }
    }
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
        let block_size = cli
            .block_size
            .or(file.block_size)
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        let default_pool = pool::parse(
            &PoolParts {
                name: DEFAULT_POOL,
                cidr: &pod_cidr_text,
                block_size: Some(block_size.into()),
                ..PoolParts::default()
            },
            block_size,
        )
        .map_err(|e| invalid_pool(Some(0), &e))?;
        let (pod_cidr, block_size) = (default_pool.cidr, default_pool.block_size);

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

        let mut pools = vec![default_pool];
        for p in &file.pools {
            let index = pools.len();
            let spec =
                pool::parse(&p.parts(), block_size).map_err(|e| invalid_pool(Some(index), &e))?;
            pools.push(spec);
        }
        pool::validate_set(&pools).map_err(|e| invalid_pool(e.index, &e.error))?;

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
                format!("{deps},ipamd={level},ferry_proto={level}")
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

/// A pool error under the key it is about: pool 0 is the default pool, from
/// the top-level keys; pool i > 0 is `pools[i - 1]`.
fn invalid_pool(index: Option<usize>, e: &PoolError) -> ConfigError {
    let key = match (index, e.field()) {
        (Some(0), Some(PoolField::Cidr)) => "pod_cidr".to_string(),
        (Some(0), Some(field)) => field.to_string(),
        (Some(i), Some(field)) => format!("pools[{}].{field}", i - 1),
        _ => "pools".to_string(),
    };
    invalid(key, e.detail())
}

#[cfg(test)]
mod tests;
