//! Test support: the fakes (Kubernetes API server, node IMDS), moto behind a recording
//! proxy, an agent harness, and a "pod" HTTP client that sends from a chosen loopback IP.
//!
//! The whole 127.0.0.0/8 range is local on Linux, so a client bound to 127.0.0.7 is the
//! pod with IP 127.0.0.7: one test can have many pods without root or namespaces.

#![allow(dead_code)]

pub mod agent_process;
pub mod apiserver;
pub mod imds;
pub mod moto;
pub mod netns;
pub mod node;
pub mod pod_client;
pub mod sts_proxy;

/// Decodes `application/x-www-form-urlencoded` text (`%XX` and `+`).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The account every test role lives in.
pub const ACCOUNT: &str = "123456789012";

/// `arn:aws:iam::123456789012:role/<name>`.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// Polls `check` every 20 ms until it holds, failing the test after `seconds`.
pub async fn eventually(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A fake server's accept loop; aborted (and its port closed) when dropped.
pub struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves HTTP/1.1 on `listener`, each request answered by `handler`.
pub fn serve<H, F, B>(listener: tokio::net::TcpListener, handler: H) -> ServerTask
where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ServerTask(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

/// A clean environment for an AWS SDK client run as a subprocess: nothing of the caller's
/// AWS configuration leaks in, so the client must find credentials where a pod would.
pub fn clean_sdk_env() -> Vec<(&'static str, String)> {
    vec![
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", "/nonexistent".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_METADATA_SERVICE_TIMEOUT", "2".into()),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "2".into()),
    ]
}

/// The environment of an agent process: test credentials, STS at `sts_url`, and no
/// metadata service for the agent's own SDK (it must never reach a real one).
pub fn agent_env(sts_url: &str) -> Vec<(&'static str, String)> {
    let mut env = clean_sdk_env();
    env.extend([
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_ENDPOINT_URL_STS", sts_url.into()),
    ]);
    env
}
