//! iamlet's test kit, shared by the integration tests, the benchmarks and the demo's fake API
//! server: the fakes (Kubernetes API server, node metadata service), moto behind a recording
//! STS proxy, the agent (in-process, or the real binary with one launcher and one flag
//! builder), a "pod" HTTP client that sends from a chosen source IP, and network namespaces
//! for the end-to-end tests.
//!
//! The whole 127.0.0.0/8 range is local on Linux, so a client bound to 127.0.0.7 is the
//! pod with IP 127.0.0.7: one test can have many pods without root or namespaces.

pub mod agent;
pub mod apiserver;
pub mod container;
pub mod e2e;
pub mod env;
pub mod flags;
pub mod fleet;
pub mod imds;
pub mod metrics;
pub mod moto;
pub mod netns;
pub mod node;
pub mod pod_client;
pub mod server;
pub mod sts_proxy;

use std::path::PathBuf;
use std::time::Duration;

pub use env::{agent_env, clean_sdk_env};
pub use flags::AgentFlags;
pub use metrics::metric_value;

/// The account every test role lives in.
pub const ACCOUNT: &str = "123456789012";

/// `arn:aws:iam::123456789012:role/<name>`.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// The repository's root (scripts, the Python virtualenv, the SDK client scripts).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the kit lives in the repository").to_path_buf()
}

/// A loopback TCP port nothing listens on right now (the kernel's choice), for a process
/// that must be told its port up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 20 ms until it holds, failing the test after `seconds`.
pub async fn eventually(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
