//! The `ferry.ipam.v1` contract, plus the few facts that plugin, ipamctl and
//! ipamd must agree on: the protocol version, the host veth name, and how to
//! reach ipamd on its Unix socket.

pub mod v1 {
    tonic::include_proto!("ferry.ipam.v1");
}

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

/// The version of `ferry.ipam.v1` this build speaks, on both sides: clients
/// send it as `client_version`, ipamd checks it against its own and reports
/// it as `server_version`.
pub const PROTOCOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The gRPC health service name ipamd reports as SERVING once it can allocate.
pub const HEALTH_SERVICE: &str = "ferry.ipam.v1.Ipam";

pub const DEFAULT_SOCKET: &str = "/run/ferry/ipamd.sock";

/// The gateway every pod routes through; the host veth answers ARP for it.
pub const POD_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// Host-side veth names start with this (see [`is_host_veth_name`]).
pub const HOST_VETH_PREFIX: &str = "fry";

/// Versions are compatible when major and minor match (pre-1.0: the minor is the break).
pub fn versions_compatible(a: &str, b: &str) -> bool {
    fn major_minor(v: &str) -> Option<(&str, &str)> {
        let mut parts = v.split('.');
        Some((parts.next()?, parts.next()?))
    }
    matches!((major_minor(a), major_minor(b)), (Some(x), Some(y)) if x == y)
}

/// `fry` + 11 hex characters of SHA-256(containerID, ifname): deterministic,
/// 14 bytes, so a stale peer from an earlier ADD is found by name.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(container_id.as_bytes());
    hasher.update([0u8]);
    hasher.update(ifname.as_bytes());
    let digest = hasher.finalize();
    // 11 hex digits: the first 6 bytes, less the last nibble. One buffer,
    // as reconcile names every allocation's veth at each look.
    let mut name = String::with_capacity(HOST_VETH_PREFIX.len() + 12);
    name.push_str(HOST_VETH_PREFIX);
    for b in &digest[..6] {
        let _ = write!(name, "{b:02x}");
    }
    name.truncate(HOST_VETH_PREFIX.len() + 11);
    name
}

/// Whether `name` is one [`host_veth_name`] makes: `fry` and exactly 11
/// lowercase hex characters. Only such a link, and only when it is a veth,
/// is ferry's to adopt or delete; an operator's `frybr0` is not.
pub fn is_host_veth_name(name: &str) -> bool {
    name.strip_prefix(HOST_VETH_PREFIX).is_some_and(|hash| {
        hash.len() == 11 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// "a: b: c" from an error and its sources, skipping a source whose text the
/// message already holds (tonic's transport errors hide the cause otherwise).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("ipamd socket {path} does not exist (is ipamd running?)")]
    NoSocket { path: PathBuf },
    #[error("cannot connect to ipamd at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel to ipamd over its Unix socket. Connects eagerly so that a dead
/// daemon is reported here, naming the socket, rather than on the first call.
pub async fn connect_uds(path: &Path, timeout: Duration) -> Result<Channel, ConnectError> {
    if !path.exists() {
        return Err(ConnectError::NoSocket {
            path: path.to_path_buf(),
        });
    }
    let socket = path.to_path_buf();
    // The URI is a placeholder: the connector below ignores it.
    Endpoint::from_static("http://ipamd.invalid")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ConnectError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_fits_ifnamsiz_and_is_deterministic() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("fry"));
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        // Pods that exist keep their veth across upgrades: the name is
        // sha256(container_id NUL ifname), first 11 hex digits, forever.
        assert_eq!(a, "fry95d930c5a66");
    }

    #[test]
    fn only_generated_names_are_host_veth_names() {
        assert!(is_host_veth_name(&host_veth_name("c1", "eth0")));
        assert!(is_host_veth_name("fry0123456789a"));
        for other in [
            "frybr0",
            "fry-other",
            "fry0123456789",
            "fry0123456789ab",
            "fry0123456789A",
            "fry0123456789g",
            "xry0123456789a",
            "",
        ] {
            assert!(!is_host_veth_name(other), "{other}");
        }
    }

    #[test]
    fn version_compatibility_is_major_minor() {
        assert!(versions_compatible("0.1.0", "0.1.7"));
        assert!(!versions_compatible("0.1.0", "0.2.0"));
        assert!(!versions_compatible("garbage", "0.1.0"));
    }
}
