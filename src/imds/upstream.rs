//! The node's real metadata service: allow-listed paths and startup discovery.
//!
//! iamlet talks to it with its own IMDSv2 token (a pod's token is iamlet's, not IMDS's), and
//! never forwards the pod's headers, so nothing like `X-Forwarded-For` reaches IMDS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, uri::Authority};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

const TOKEN_TTL: Duration = Duration::from_secs(21600);
/// Bodies larger than this are not relayed (IMDS documents are a few KiB).
const MAX_BODY: usize = 64 * 1024;

/// Why the real IMDS could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("metadata service at {0} did not answer in time")]
    Timeout(Authority),
    #[error("metadata service at {authority}: {message}")]
    Failed { authority: Authority, message: String },
}

/// A response of the real IMDS.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// A client of the node's IMDS.
pub struct UpstreamImds {
    client: Client<HttpConnector, Empty<Bytes>>,
    authority: Authority,
    timeout: Duration,
    /// iamlet's own session token and when to stop using it.
    token: Mutex<Option<(String, Instant)>>,
}

impl UpstreamImds {
    pub fn new(authority: Authority, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { client, authority, timeout, token: Mutex::new(None) }
    }

    /// `GET path` with a session token (fetched when needed; IMDSv1 if IMDS gives none).
    pub async fn get(&self, path: &str) -> Result<UpstreamResponse, UpstreamError> {
        let token = self.token().await;
        let response = self.send(Method::GET, path, token.as_deref()).await?;
        if response.status == StatusCode::UNAUTHORIZED && token.is_some() {
            // IMDS restarted or the token was revoked: get a new one, once.
            *self.token.lock().await = None;
            let token = self.token().await;
            return self.send(Method::GET, path, token.as_deref()).await;
        }
        Ok(response)
    }

    /// Whether the node's metadata service answers without a token (IMDSv1): `None` when it
    /// cannot be asked. A harmless path, asked the way a pod would ask it when iamlet's rules
    /// are absent.
    pub async fn answers_without_token(&self) -> Option<bool> {
        match self.send(Method::GET, "/latest/meta-data/", None).await {
            Ok(response) if response.status == StatusCode::UNAUTHORIZED => Some(false),
            Ok(response) if response.status.is_success() => Some(true),
            Ok(response) => {
                tracing::debug!(status = %response.status, "unexpected answer to a tokenless metadata request");
                None
            }
            Err(error) => {
                tracing::debug!(%error, "cannot ask the node's metadata service whether IMDSv1 is on");
                None
            }
        }
    }

    /// `GET path`, requiring 200, as text.
    pub async fn get_text(&self, path: &str) -> Result<String, UpstreamError> {
        let response = self.get(path).await?;
        if response.status != StatusCode::OK {
            return Err(self.failed(format!("GET {path} answered {}", response.status)));
        }
        String::from_utf8(response.body.to_vec()).map_err(|_| self.failed(format!("GET {path} answered non-text")))
    }

    async fn token(&self) -> Option<String> {
        let mut slot = self.token.lock().await;
        if let Some((token, until)) = slot.as_ref()
            && Instant::now() < *until
        {
            return Some(token.clone());
        }
        match self.send(Method::PUT, "/latest/api/token", None).await {
            Ok(response) if response.status == StatusCode::OK => {
                let token = String::from_utf8_lossy(&response.body).trim().to_string();
                *slot = Some((token.clone(), Instant::now() + TOKEN_TTL - Duration::from_secs(600)));
                Some(token)
            }
            Ok(response) => {
                tracing::debug!(status = %response.status, "metadata service gave no token; using IMDSv1");
                None
            }
            Err(error) => {
                tracing::debug!(%error, "metadata service token request failed; using IMDSv1");
                None
            }
        }
    }

    async fn send(&self, method: Method, path: &str, token: Option<&str>) -> Result<UpstreamResponse, UpstreamError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| self.failed(e.to_string()))?;
        let mut request = Request::builder().method(method.clone()).uri(uri);
        if method == Method::PUT {
            request = request.header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL.as_secs());
        }
        if let Some(token) = token {
            request = request.header("x-aws-ec2-metadata-token", token);
        }
        let request = request.body(Empty::new()).map_err(|e| self.failed(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| self.failed(e.to_string()))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| self.failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(UpstreamResponse { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.authority.clone()))?
    }

    fn failed(&self, message: String) -> UpstreamError {
        UpstreamError::Failed { authority: self.authority.clone(), message }
    }
}

/// Warns once, and sets `iamlet_node_imdsv1_enabled`, when the node's metadata service
/// answers IMDSv1: then nothing but iamlet's rules stands between a pod and the node's role.
pub async fn report_node_exposure(upstream: Arc<UpstreamImds>, metrics: Arc<crate::metrics::Metrics>) {
    match upstream.answers_without_token().await {
        Some(true) => {
            metrics.node_imdsv1_enabled.set(1);
            tracing::warn!(
                metadata = %upstream.authority,
                "the node's metadata service answers IMDSv1: pods would reach the node's credentials whenever \
                 iamlet's rules are absent. Require IMDSv2 with a hop limit of 1 (HttpTokens=required, \
                 HttpPutResponseHopLimit=1) on the node's launch template or with \
                 `aws ec2 modify-instance-metadata-options`"
            );
        }
        Some(false) => {
            metrics.node_imdsv1_enabled.set(0);
            tracing::info!("the node's metadata service requires IMDSv2");
        }
        None => {}
    }
}

impl crate::policy::NodeMetadata for UpstreamImds {
    fn get_text<'a>(
        &'a self,
        path: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<String, crate::policy::BoxError>> {
        Box::pin(async move { UpstreamImds::get_text(self, path).await.map_err(Into::into) })
    }
}
