//! An HTTP client that is "a pod": it sends from a chosen source IP.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

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

/// A connection from `from` to `to`.
pub async fn connect(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let from: IpAddr = from.parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// One request from the pod at `from`.
pub async fn request(from: &str, to: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    exchange(connect(from, to).await, method, path, headers).await
}

/// One request from wherever this task runs (a namespace's thread, say), or `None` if the
/// connection fails or is not answered within `timeout`.
pub async fn fetch(
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Option<Reply> {
    try_fetch(to, path, headers, timeout).await.ok()
}

/// Like [`fetch`], but says how it failed: `connection refused`, `reset`, `timed out`...
pub async fn try_fetch(
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Result<Reply, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        try_exchange(stream, "GET", path, headers).await
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "timed out".to_string())?
}

async fn exchange(stream: tokio::net::TcpStream, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    try_exchange(stream, method, path, headers).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

async fn try_exchange(
    stream: tokio::net::TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut builder = Request::builder().method(method).uri(path).header("host", "169.254.169.254");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response =
        sender.send_request(builder.body(Empty::<Bytes>::new()).unwrap()).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
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
