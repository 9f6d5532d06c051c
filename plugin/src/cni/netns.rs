//! CNI_NETNS for ADD and CHECK: it must exist, and it must not be the
//! node's own network namespace, so that a misconfigured runtime never gets
//! pod addresses and routes put on the host.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::{CniError, code};

/// The runtime execs the plugin in the node's network namespace.
pub const NODE_NETNS: &str = "/proc/self/ns/net";

/// `netns` exists (else 103) and is another namespace than `node` (else 4).
/// Namespaces are compared by device and inode: a bind mount under
/// /run/netns and a /proc/PID/ns/net link of the same namespace are one.
pub fn check_pod_netns(netns: &Path, node: &Path) -> Result<(), CniError> {
    let pod = std::fs::metadata(netns).map_err(|e| {
        let why = match e.kind() {
            ErrorKind::NotFound => "does not exist".to_string(),
            _ => format!("cannot be read: {e}"),
        };
        CniError::new(
            code::NETNS,
            format!("network namespace {} {why}", netns.display()),
        )
    })?;
    let own = std::fs::metadata(node).map_err(|e| {
        CniError::new(
            code::IO,
            format!(
                "cannot read the node's network namespace {}: {e}",
                node.display()
            ),
        )
    })?;
    if (pod.dev(), pod.ino()) == (own.dev(), own.ino()) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS {} is the node's own network namespace, not a pod's",
                netns.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(netns: &str) -> Result<(), CniError> {
        check_pod_netns(Path::new(netns), Path::new(NODE_NETNS))
    }

    #[test]
    fn the_node_netns_is_refused_under_any_path() {
        // thread-self is another link to the same namespace.
        for path in [NODE_NETNS, "/proc/thread-self/ns/net"] {
            let e = check(path).unwrap_err();
            assert_eq!(e.code, 4, "{path}");
            assert!(
                e.msg.contains("CNI_NETNS") && e.msg.contains(path),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn another_namespace_passes_and_a_missing_one_is_103() {
        // Another namespace of this process, so surely not its netns.
        assert_eq!(check("/proc/self/ns/uts"), Ok(()));
        let e = check("/nonexistent/netns/p1").unwrap_err();
        assert_eq!(e.code, 103);
        assert_eq!(
            e.msg,
            "network namespace /nonexistent/netns/p1 does not exist"
        );
    }

    #[test]
    fn an_unreadable_node_netns_fails_closed() {
        let e = check_pod_netns(Path::new(NODE_NETNS), Path::new("/nonexistent/ns")).unwrap_err();
        assert_eq!(e.code, 5, "{e:?}");
    }
}
