//! Small helpers: where the binaries are, unique names, polling, child guards.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where ferry's binaries are: `$FERRY_BIN_DIR`, else `<workspace>/target/release`.
///
/// Panics with "run cargo build --release first" when `ferry`, `ipamd` or
/// `ipamctl` is missing there.
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("FERRY_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target").join("release"),
    };
    for name in ["ferry", "ipamd", "ipamctl"] {
        if !dir.join(name).is_file() {
            panic!(
                "{} is missing: run cargo build --release first (or set FERRY_BIN_DIR)",
                dir.join(name).display()
            );
        }
    }
    dir
}

/// Full path of one of ferry's binaries (`ferry`, `ipamd`, `ipamctl`) in [`bin_dir`].
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Where the reference CNI plugins (portmap, loopback, ...) live:
/// `$FERRY_CNI_PLUGIN_DIR`, else `/usr/lib/cni` (Debian's
/// containernetworking-plugins), else `/opt/cni/bin`.
pub fn cni_plugin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_CNI_PLUGIN_DIR")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    for d in ["/usr/lib/cni", "/opt/cni/bin"] {
        if Path::new(d).join("portmap").is_file() {
            return PathBuf::from(d);
        }
    }
    PathBuf::from("/usr/lib/cni")
}

/// True when we run as root (euid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Panics unless we are root: the e2e tests create network namespaces.
pub fn require_root() {
    if !is_root() {
        panic!(
            "this end-to-end test needs root (it creates network namespaces): run tests/run-all.sh as root"
        );
    }
}

/// A short name unique to this process and call: `<prefix><pid>x<n>`.
///
/// Keep prefixes to 3-4 characters when the result names an interface
/// (at most 15 bytes).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// A fresh 64-hex-character container ID, like the ones containerd makes.
pub fn random_container_id() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// What one look at a condition found.
pub enum Poll<T, Seen = String> {
    Ready(T),
    /// Not yet; what was seen (for the timeout message).
    Pending(Seen),
}

/// Looks every `every` until `look` is ready; `Ok(Err(seen))` with what the
/// last look saw once `timeout` has passed. An error from `look` ends the
/// wait at once. Every wait in the harness is one of these: never a bare sleep.
pub(crate) fn look_every<T, Seen>(
    timeout: Duration,
    every: Duration,
    mut look: impl FnMut() -> Result<Poll<T, Seen>>,
) -> Result<Result<T, Seen>> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match look()? {
            Poll::Ready(v) => return Ok(Ok(v)),
            Poll::Pending(seen) => seen,
        };
        if Instant::now() >= deadline {
            return Ok(Err(seen));
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` every 50 ms until it returns `Ok(Some(v))`, or fails after
/// `timeout` with `what` and the last error in the message. An error from
/// `f` is retried (the thing waited for may not answer yet).
///
/// This is the only way tests wait for readiness: never a bare sleep.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let mut last_err = String::new();
    let outcome = look_every(timeout, Duration::from_millis(50), || {
        match f() {
            Ok(Some(v)) => return Ok(Poll::Ready(v)),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        Ok(Poll::Pending(()))
    })?;
    match outcome {
        Ok(v) => Ok(v),
        Err(()) if last_err.is_empty() => bail!("timed out after {timeout:?} waiting for {what}"),
        Err(()) => {
            bail!("timed out after {timeout:?} waiting for {what}; last error: {last_err}")
        }
    }
}

/// Looks at `f` every 50 ms until it is ready, failing after `timeout` with
/// `what` and what the last look saw. Unlike [`wait_until`], an error from
/// `f` is final (e.g. the process waited for has exited) and is returned at
/// once.
pub fn poll<T>(what: &str, timeout: Duration, f: impl FnMut() -> Result<Poll<T>>) -> Result<T> {
    match look_every(timeout, Duration::from_millis(50), f)? {
        Ok(v) => Ok(v),
        Err(seen) => bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}"),
    }
}

/// The last `n` lines of the file at `path` (empty if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends `sig` to `pid` (a process we started ourselves).
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) with a concrete positive PID we spawned; no memory involved.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// Waits for `child` up to `timeout`; `None` if it is still running (or
/// cannot be waited for).
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let exited = look_every(timeout, Duration::from_millis(20), || {
        Ok(match child.try_wait() {
            Ok(Some(status)) => Poll::Ready(Some(status)),
            Ok(None) => Poll::Pending(()),
            Err(_) => Poll::Ready(None),
        })
    });
    exited.ok().and_then(Result::ok).flatten()
}

/// Owns a child process; on drop it is SIGKILLed (by its PID) and reaped.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The child, while we still own it.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL if it is still there.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        signal(child.id(), libc::SIGTERM);
        match wait_timeout(&mut child, timeout) {
            Some(st) => Some(st),
            None => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
