//! An HTTP client that is "a pod": it sends from a chosen source IP. One-shot requests for
//! tests, and keep-alive [`Connection`]s for the benchmark's load.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// What the agent answered.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl From<Response<Bytes>> for Reply {
    fn from(response: Response<Bytes>) -> Self {
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// An HTTP/1.1 connection, kept alive across requests until the server closes it.
pub struct Connection(SendRequest<Empty<Bytes>>);

impl Connection {
    /// Connects from `from` (any local address when `None`) to `to`.
    pub async fn open(from: Option<IpAddr>, to: SocketAddr) -> Result<Self, String> {
        Self::over(tcp_from(from, to).await.map_err(|e| e.to_string())?).await
    }

    /// An HTTP connection over a connected stream.
    pub async fn over(stream: TcpStream) -> Result<Self, String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self(sender))
    }

    /// One request, addressed to the metadata service's host, and its whole answer.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Bytes>, String> {
        let mut request = Request::builder().method(method).uri(path).header("host", "169.254.169.254");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
        self.0.ready().await.map_err(|e| e.to_string())?;
        let response = self.0.send_request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// A bare TCP connection from `from` (any local address when `None`) to `to`.
pub async fn tcp_from(from: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    if let Some(from) = from {
        socket.bind(SocketAddr::new(from, 0))?;
    }
    socket.connect(to).await
}

/// A connection from the pod at `from` to `to`.
pub async fn connect(from: &str, to: SocketAddr) -> TcpStream {
    tcp_from(Some(from.parse().expect("a pod IP")), to).await.unwrap_or_else(|e| panic!("connect from {from}: {e}"))
}

/// One request from the pod at `from`.
pub async fn request(from: &str, to: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let from = Some(from.parse().expect("a pod IP"));
    let answer = async { Connection::open(from, to).await?.send(method, path, headers).await };
    Reply::from(answer.await.unwrap_or_else(|e| panic!("{method} {path}: {e}")))
}

/// One request from wherever this task runs (a namespace's thread, say), or `None` if the
/// connection fails or is not answered within `timeout`.
pub async fn fetch(to: SocketAddr, path: &str, headers: &[(&str, &str)], timeout: Duration) -> Option<Reply> {
    try_fetch(to, path, headers, timeout).await.ok()
}

/// Like [`fetch`], but says how it failed: `connection refused`, `reset`, `timed out`...
pub async fn try_fetch(
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reply, String> {
    let exchange = async { Connection::open(None, to).await?.send("GET", path, headers).await };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "timed out".to_string())?.map(Reply::from)
}

/// `GET path` from `from` on a connection of its own, or how it failed.
pub async fn try_get(from: IpAddr, to: SocketAddr, path: &str) -> Result<Reply, String> {
    Ok(Connection::open(Some(from), to).await?.send("GET", path, &[]).await?.into())
}

/// `GET path` from the pod at `from`.
pub async fn get(from: &str, to: SocketAddr, path: &str) -> Reply {
    request(from, to, "GET", path, &[]).await
}

/// An IMDSv2 token for the pod at `from`.
pub async fn token(from: &str, to: SocketAddr) -> String {
    let reply = request(from, to, "PUT", "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", "300")]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}
