//! The local xDS tier's Unix socket: the one listener that serves the vehicle's
//! certificate and key (SDS) to its Envoy.
//!
//! Invariants:
//! - Who may connect is decided by the socket file's permissions, set before the socket
//!   listens: mode 0600 (edge-netd's own user), or 0660 with `socket_group` (the
//!   vehicle Envoy's group). Not merely before the first accept: a `connect` succeeds
//!   as soon as the socket listens (the kernel queues it) and is served at the next
//!   accept, so a socket that listened with the umask's mode for a moment could hand
//!   the key to whoever connected in that moment. A loopback TCP port cannot say any of
//!   this: any local process reaches it, so the TCP listener never serves the credential.
//! - Only a socket is ever removed from the path (the stale one of a previous run); any
//!   other file there is an error, never deleted.
//! - Every accepted peer's credentials (uid, gid, pid) are logged: who read the key is
//!   on record.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::XdsSocket;

/// Why the socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}: exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    #[error("xds.socket_group {0:?}: no such group")]
    NoGroup(String),
}

fn io_error<'p>(path: &'p Path, what: &'static str) -> impl FnOnce(io::Error) -> SocketError + 'p {
    move |source| SocketError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Connections the kernel queues for accept (tokio's own default for Unix listeners).
const BACKLOG: i32 = 1024;

/// Bind the socket at `socket.path` and listen, its permissions in place first.
pub fn bind(socket: &XdsSocket) -> Result<UnixListener, SocketError> {
    let path = socket.path.as_path();
    let sock = bind_with_mode(socket)?;
    sock.listen(BACKLOG).map_err(io_error(path, "listening"))?;
    sock.set_nonblocking(true)
        .map_err(io_error(path, "listening"))?;
    UnixListener::from_std(sock.into()).map_err(io_error(path, "listening"))
}

/// The socket bound at `socket.path` with its mode and group, not listening yet: until
/// it listens every connect is refused, whatever mode the umask gave the file for a
/// moment. (`UnixListener::bind` would bind and listen at once.)
fn bind_with_mode(socket: &XdsSocket) -> Result<socket2::Socket, SocketError> {
    let path = socket.path.as_path();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io_error(path, "removing the stale socket"))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, "inspecting")(e)),
    }
    let gid = match &socket.group {
        Some(name) => Some(group_id(name)?),
        None => None,
    };
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(io_error(path, "creating the socket"))?;
    let addr = socket2::SockAddr::unix(path).map_err(io_error(path, "binding"))?;
    sock.bind(&addr).map_err(io_error(path, "binding"))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error(path, "setting the mode"))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io_error(path, "setting the group"))?;
    }
    Ok(sock)
}

fn group_id(name: &str) -> Result<u32, SocketError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(SocketError::NoGroup(name.to_owned())),
    }
}

/// The accepted connections, each peer logged.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixStream>> {
    UnixListenerStream::new(listener).inspect(|conn| {
        if let Ok(stream) = conn {
            match stream.peer_cred() {
                Ok(c) => tracing::info!(
                    uid = c.uid(),
                    gid = c.gid(),
                    pid = ?c.pid(),
                    "local xDS client on the socket"
                ),
                Err(e) => tracing::warn!(error = %e, "local xDS client with unknown credentials"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_mode_is_owner_only_without_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.sock");
        let socket = XdsSocket {
            path: path.clone(),
            group: None,
        };
        let first = bind(&socket).unwrap();
        drop(first);
        let _again = bind(&socket).expect("the stale socket is replaced");
        assert_eq!(mode(&path), 0o600);
    }

    /// The mode is in place before anyone can connect: a connect made between bind and
    /// listen is refused, never queued for a later accept.
    #[tokio::test]
    async fn nobody_connects_before_the_mode_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.sock");
        let socket = XdsSocket {
            path: path.clone(),
            group: None,
        };
        let bound = bind_with_mode(&socket).unwrap();
        assert_eq!(mode(&path), 0o600);
        let early = std::os::unix::net::UnixStream::connect(&path).unwrap_err();
        assert_eq!(early.kind(), io::ErrorKind::ConnectionRefused, "{early}");
        drop(bound);

        let listener = bind(&socket).unwrap();
        assert_eq!(mode(&path), 0o600);
        let _client = UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[tokio::test]
    async fn a_group_makes_it_group_connectable_and_other_files_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.sock");
        let socket = XdsSocket {
            path: path.clone(),
            group: Some("root".into()),
        };
        let _l = bind(&socket).unwrap();
        assert_eq!(mode(&path), 0o660);

        let file = dir.path().join("precious");
        std::fs::write(&file, "data").unwrap();
        let e = bind(&XdsSocket {
            path: file.clone(),
            group: None,
        })
        .unwrap_err();
        assert!(matches!(e, SocketError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");

        let e = bind(&XdsSocket {
            path: dir.path().join("other.sock"),
            group: Some("no-such-group-here".into()),
        })
        .unwrap_err();
        assert!(matches!(e, SocketError::NoGroup(_)), "{e}");
    }
}
