//! The HTTP serving loop shared by the metadata API and the admin port.
//!
//! Each server takes its listener and a shutdown future (tests bind port 0 and pass their
//! own), stops accepting when the future resolves, and gives open connections a bounded
//! grace period to finish their requests.
//!
//! Every pod reaches the metadata port, so what one client may hold is bounded: connections
//! per source IP and in total (one over either limit is closed as soon as it is accepted),
//! the time to send a request's headers, and their size. A pod that opens connections in a
//! loop, or trickles its headers, exhausts its own share, never the node's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Every response body iamlet sends: small and complete.
pub type Body = Full<Bytes>;

/// A `text/plain` response, as IMDS sends everything.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone.
    pub connections: usize,
    /// Connections open at once from one source IP (one pod).
    pub connections_per_ip: usize,
    /// Longest wait for a request's headers, idle keep-alive connections included.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; at least 8 KiB.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 2048,
            connections_per_ip: 64,
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Limits::connections` were open.
    Total,
    /// `Limits::connections_per_ip` were open from the same IP.
    PerIp,
}

/// Open connections, in total and by source IP. Entries go when their count drops to zero,
/// so the map holds only IPs with a connection open.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    /// Woken when the last connection closes.
    none_left: Arc<tokio::sync::Notify>,
}

/// A connection's place among the open ones, given back when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        open.total -= 1;
        if open.total == 0 {
            open.none_left.notify_waiters();
        }
        if let Some(count) = open.by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

fn admit(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &Limits) -> Result<Slot, Refusal> {
    let mut state = open.lock();
    if state.total >= limits.connections {
        return Err(Refusal::Total);
    }
    let from_ip = state.by_ip.entry(ip).or_default();
    if *from_ip >= limits.connections_per_ip {
        return Err(Refusal::PerIp);
    }
    *from_ip += 1;
    state.total += 1;
    Ok(Slot { open: open.clone(), ip })
}

/// How long a draining server waits for its clients to close their connections themselves
/// (each is answered with `Connection: close`) before it closes the idle ones.
const LINGER: Duration = Duration::from_secs(1);

/// Where a server is in its life. An agent's servers go through these in order, some
/// skipped: a successor's wait for their predecessor's sockets, a predecessor's idle time
/// after handing them over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Holding the listening socket, not accepting: another agent still does.
    Waiting,
    Accepting,
    /// No longer accepting (another agent does), still serving the connections it has.
    Released,
    /// Finishing in-flight requests, then closing every connection.
    Draining,
}

/// Serves connections from `listener` with `handler` as `phase` says: accepting from
/// [`Phase::Accepting`], closing its copy of the listening socket from
/// [`Phase::Released`] (connections waiting in the socket's queue stay there for another
/// holder), and from [`Phase::Draining`] (or when the sender is dropped) waiting up to
/// `grace` for in-flight requests. Connections over `limits` are closed at once and reported
/// to `refused`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    mut phase: watch::Receiver<Phase>,
    grace: Duration,
    limits: Limits,
    refused: impl Fn(Refusal),
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Mutex::new(Open::default()));
    let accepting =
        phase.wait_for(|phase| *phase != Phase::Waiting).await.is_ok_and(|phase| *phase == Phase::Accepting);
    let mut until_released = phase.clone();
    let released = async move {
        let _ = until_released.wait_for(|phase| *phase >= Phase::Released).await;
    };
    futures::pin_mut!(released);
    if accepting {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut released => break,
            };
            let slot = match admit(&open, peer.ip().to_canonical(), &limits) {
                Ok(slot) => slot,
                Err(refusal) => {
                    refused(refusal);
                    continue; // dropping the stream closes it
                }
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let closing = phase.clone();
            let service = service_fn(move |request| {
                let response = handler(peer, request);
                let closing = closing.clone();
                async move {
                    let mut response = response.await;
                    // Released (a successor accepts now) or draining: the client closes this
                    // connection itself once it has the answer, and its next request opens one
                    // to the successor. Closing an idle connection from here instead races with
                    // a request the client may be sending on it.
                    if *closing.borrow() >= Phase::Released {
                        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                drop(slot);
            });
        }
    }
    drop(listener);
    let _ = phase.wait_for(|phase| *phase == Phase::Draining).await;
    // Before closing what is idle, the clients still using their connections get one more
    // answer each, with `Connection: close`, and close them themselves: a connection closed
    // by the server races with a request the client may be sending on it (a fresh connection
    // whose first request is on its way looks idle too).
    let linger = async {
        loop {
            let none_left = open.lock().none_left.clone();
            let notified = none_left.notified();
            if open.lock().total == 0 {
                return;
            }
            notified.await;
        }
    };
    let _ = tokio::time::timeout(LINGER.min(grace), linger).await;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = %humantime::format_duration(grace), "connections still open after the grace period; closing them");
    }
}

/// The uid of the process listening on `addr`'s port (on that address or a wildcard one), from
/// `/proc/net/tcp` and `tcp6`: who holds a port iamlet cannot bind.
pub fn listener_uid(addr: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|table| listening_uid(&table, addr))
}

/// The uid of a listening socket in a `/proc/net/tcp{,6}` table that conflicts with `addr`.
fn listening_uid(table: &str, addr: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
        let (ip, port) = local.split_once(':')?;
        let ip = proc_ip(ip)?;
        let same = u16::from_str_radix(port, 16).ok()? == addr.port()
            && (ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified());
        (*state == "0A" && same).then(|| uid.parse().ok()).flatten()
    })
}

/// An address as `/proc/net/tcp` writes it: the kernel's 32-bit words, each in host order.
fn proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()).collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|word| word.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?).to_canonical()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_port_is_found_in_the_kernels_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100FE0A:1FF5 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 1 1
   1: 00000000:1FF6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100FE0A:0050 0200FE0A:C350 01 00000000:00000000 00:00000000 00000000  1000        0 3 1
";
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert_eq!(listening_uid(table, addr("10.254.0.1:8181")), Some(65534), "10.254.0.1:8181 is 0100FE0A:1FF5");
        assert_eq!(listening_uid(table, addr("0.0.0.0:8181")), Some(65534));
        assert_eq!(listening_uid(table, addr("10.254.0.1:8182")), Some(0), "a wildcard listener conflicts");
        assert_eq!(listening_uid(table, addr("10.254.0.1:80")), None, "not listening");
        assert_eq!(listening_uid(table, addr("10.254.0.2:8181")), None);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000000000000000000001000000:1FF5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1234
";
        assert_eq!(listening_uid(v6, addr("[::1]:8181")), Some(1234));
        // Our own listener, as the kernel shows it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(listener_uid(listener.local_addr().unwrap()), Some(uid));
    }

    #[test]
    fn connections_are_bounded_per_ip_and_in_total_and_given_back() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits { connections: 3, connections_per_ip: 2, ..Limits::default() };
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let first = admit(&open, a, &limits).unwrap();
        let _second = admit(&open, a, &limits).unwrap();
        assert_eq!(admit(&open, a, &limits).err(), Some(Refusal::PerIp));
        let _third = admit(&open, b, &limits).unwrap();
        assert_eq!(admit(&open, c, &limits).err(), Some(Refusal::Total));
        drop(first);
        assert!(admit(&open, a, &limits).is_ok(), "a closed connection gives its place back");
        drop(_third);
        assert!(!open.lock().by_ip.contains_key(&b), "no entry for an IP with nothing open");
    }
}
