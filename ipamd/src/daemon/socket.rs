//! The gRPC socket: absent until ipamd can answer, 0600 from its first
//! moment, never taken from a live ipamd.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("another ipamd is already serving on {}; refusing to start", .0.display())]
    Taken(PathBuf),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io { what, path, source }
}

/// Removes a socket file nobody answers on; refuses when someone does, or
/// when the path is not a socket at all.
pub fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspecting", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::Taken(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound => {
            warn!(socket = %path.display(), "removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    Err(io("removing stale socket", path)(e))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(io("probing existing socket", path)(e)),
    }
}

/// Binds with a umask that leaves the socket 0600 from its first moment,
/// then sets the mode explicitly, all before anything is served.
/// The umask is the process's: a file another thread creates meanwhile gets
/// it too, which only matters to a process that is not root.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("creating socket directory", parent))?;
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod 0600", path))?;
    Ok(listener)
}

pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => warn!(socket = %path.display(), error = %e, "cannot remove socket"),
    }
}
