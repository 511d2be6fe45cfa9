//! systemd integration without a library: `READY=1`, `WATCHDOG=1` pings and `STOPPING=1` sent as datagrams
//! to `$NOTIFY_SOCKET` (sd_notify(3)); a no-op when the agent does not run under systemd `Type=notify`.

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
    fn without_systemd_nothing_is_sent() {
        let notifier = Notifier::disabled();
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
    }
}
