//! Sysctls of the node netns, written through /proc/sys (which shows the
//! netns of the process, i.e. ipamd's).

use std::path::Path;

use super::NodeError;

pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Sets `path` to 1 unless it already is. Returns whether it changed.
pub fn ensure_ip_forward(path: &Path) -> Result<bool, NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let current = std::fs::read_to_string(path).map_err(io)?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, b"1\n").map_err(io)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ip_forward");
        std::fs::write(&p, "0\n").unwrap();
        assert!(ensure_ip_forward(&p).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "1");
        assert!(!ensure_ip_forward(&p).unwrap());
        let missing = dir.path().join("nope");
        let e = ensure_ip_forward(&missing).unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
