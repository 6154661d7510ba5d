//! Readiness for a supervisor: `READY=1` on the datagram socket named by `NOTIFY_SOCKET`
//! (systemd's sd_notify protocol; the lab uses it too), sent once the server serves: model
//! loaded, listeners accepting. Ports are bound before the model loads, so an open port does
//! not mean ready; this does.
//!
//! The socket is connected at start-up, before confinement (afterwards Landlock and seccomp
//! allow neither a new socket nor a path lookup), and only written to after: a connected
//! datagram socket needs nothing more.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier(Option<UnixDatagram>);

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` when it is set: a path, or `@name` for an abstract socket.
    /// A socket that cannot be reached is logged and ignored: readiness is a courtesy to the
    /// supervisor, not a reason to refuse to serve.
    pub fn from_env() -> Self {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self(None);
        };
        let target = target.to_string_lossy().into_owned();
        match connect(&target) {
            Ok(s) => Self(Some(s)),
            Err(e) => {
                tracing::warn!(socket = %target, error = %e, "NOTIFY_SOCKET unreachable: readiness will not be reported");
                Self(None)
            }
        }
    }

    /// Tells the supervisor the server is ready.
    pub fn ready(&self) {
        if let Some(s) = &self.0
            && let Err(e) = s.send(b"READY=1\n")
        {
            tracing::warn!(error = %e, "reporting readiness on NOTIFY_SOCKET failed");
        }
    }
}

fn connect(target: &str) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => socket.connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?,
        None => socket.connect(target)?,
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path socket gets exactly `READY=1`.
    #[test]
    fn ready_is_sent_to_the_connected_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier(Some(connect(path.to_str().unwrap()).unwrap()));
        n.ready();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\n");
    }
}
