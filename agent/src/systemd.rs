//! systemd integration without a library: `READY=1`, `WATCHDOG=1` pings and `STOPPING=1` sent as datagrams
//! to `$NOTIFY_SOCKET` (sd_notify(3)), a no-op when the agent does not run under systemd `Type=notify`; and
//! socket activation (sd_listen_fds(3)): the front port's listening socket passed as fd 3 with `LISTEN_FDS`
//! and `LISTEN_PID`, so clients queue in the kernel while the agent restarts instead of being refused.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go, read once from the environment by the binary and handed to the agent.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    socket: Option<PathBuf>,
    /// Half of `WATCHDOG_USEC`, when systemd expects pings from this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Notifications to `socket` (a path, or `@name` for an abstract socket); pings every half of `watchdog`.
    pub fn new(socket: PathBuf, watchdog: Option<Duration>) -> Notifier {
        Notifier { socket: Some(socket), watchdog: watchdog.map(|w| w / 2).filter(|w| !w.is_zero()) }
    }

    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (pings only when meant for this process).
    pub fn from_env() -> Notifier {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
            return Notifier::disabled();
        };
        let for_us = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|_| for_us)
            .map(Duration::from_micros);
        Notifier::new(PathBuf::from(socket), watchdog)
    }

    /// How often to ping the watchdog, when systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=Serving through the front proxy.");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=Stopping: draining and stopping llama-server.");
    }

    /// Sends one notification; failures are logged, never fatal (systemd may be gone during shutdown).
    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else { return };
        if let Err(e) = send_to(socket, message.as_bytes()) {
            tracing::warn!(socket = %socket.display(), error = %e, "Cannot notify systemd.");
        }
    }
}

/// The first descriptor systemd passes (sd_listen_fds(3)).
const LISTEN_FDS_START: i32 = 3;

/// How many sockets systemd passed to this process: `LISTEN_FDS` when `LISTEN_PID` names `pid` (the variables
/// are inherited by children, who must not take them for theirs), otherwise none.
pub fn listen_fds_count(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> usize {
    let for_us = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(pid);
    if !for_us {
        return 0;
    }
    listen_fds.and_then(|n| n.trim().parse::<usize>().ok()).unwrap_or(0)
}

/// The front port's socket when systemd passed one (the first passed descriptor, which must be a listening TCP
/// socket), made close-on-exec so llama-server does not inherit it. The caller should then remove
/// `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` from the environment (before any thread starts).
pub fn front_listener_from_env() -> std::io::Result<Option<std::net::TcpListener>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let count = listen_fds_count(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    );
    if count == 0 {
        return Ok(None);
    }
    // SAFETY: fcntl on a descriptor number only inspects or changes its flags; an invalid one fails with EBADF.
    let flags = unsafe { libc::fcntl(LISTEN_FDS_START, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(LISTEN_FDS_START, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours) and nothing else in the agent owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let listener = std::net::TcpListener::from(fd);
    // Fails unless it is a TCP socket; a socket unit with another ListenStream= type is a configuration error.
    listener.local_addr()?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn send_to(socket: &std::path::Path, message: &[u8]) -> std::io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    let text = socket.to_string_lossy();
    if let Some(name) = text.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            datagram.send_to_addr(message, &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        return Err(std::io::Error::other(format!("abstract socket @{name} is only supported on Linux")));
    }
    datagram.send_to(message, socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifications_reach_the_socket_and_the_watchdog_pings_at_half_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let notifier = Notifier::new(path, Some(Duration::from_secs(10)));
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        notifier.ready();
        assert!(receive(&socket).starts_with("READY=1\n"));
        notifier.watchdog();
        assert_eq!(receive(&socket), "WATCHDOG=1");
        notifier.stopping();
        assert!(receive(&socket).starts_with("STOPPING=1"));
    }

    #[test]
    fn passed_sockets_count_only_for_the_process_they_were_meant_for() {
        assert_eq!(listen_fds_count(Some("42"), Some("1"), 42), 1);
        assert_eq!(listen_fds_count(Some("41"), Some("1"), 42), 0, "inherited from a parent");
        assert_eq!(listen_fds_count(None, Some("1"), 42), 0);
        assert_eq!(listen_fds_count(Some("42"), None, 42), 0);
        assert_eq!(listen_fds_count(Some("42"), Some("x"), 42), 0);
    }

    #[test]
    fn without_systemd_nothing_is_sent() {
        let notifier = Notifier::disabled();
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
    }
}
