//! Test support: the fakes (Kubernetes API server, node IMDS), moto behind a recording
//! proxy, an agent harness, and a "pod" HTTP client that sends from a chosen loopback IP.
//!
//! The whole 127.0.0.0/8 range is local on Linux, so a client bound to 127.0.0.7 is the
//! pod with IP 127.0.0.7: one test can have many pods without root or namespaces.

#![allow(dead_code)]

pub mod agent_process;
pub mod apiserver;
pub mod e2e;
pub mod env;
pub mod imds;
pub mod moto;
pub mod netns;
pub mod node;
pub mod pod_client;
pub mod server;
pub mod sts_proxy;

#[allow(unused_imports)] // each test binary uses some of them
pub use env::{agent_env, clean_sdk_env, loopback_agent_args};

/// The account every test role lives in.
pub const ACCOUNT: &str = "123456789012";

/// `arn:aws:iam::123456789012:role/<name>`.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// The value of the first sample of metric `name` (with or without labels) in a Prometheus
/// text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Polls `check` every 20 ms until it holds, failing the test after `seconds`.
pub async fn eventually(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
