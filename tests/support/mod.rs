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
pub mod server;
pub mod sts_proxy;

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
