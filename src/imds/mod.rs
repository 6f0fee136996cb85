//! The metadata API pods see, on the app port.
//!
//! [`routes`] decides where a path goes, [`token`] issues and checks IMDSv2 tokens,
//! [`render`] shapes bodies like IMDS, [`upstream`] talks to the node's real IMDS, and
//! [`service`] puts them together for one request.

pub mod render;
pub mod routes;
pub mod service;
pub mod token;
pub mod upstream;

use std::time::Duration;

pub use service::ImdsService;
pub use token::TokenIssuer;
pub use upstream::UpstreamImds;

/// How the metadata API behaves, from the metadata API flags.
#[derive(Debug, Clone)]
pub struct ImdsSettings {
    pub app_port: u16,
    /// The node's real metadata service, for allow-listed paths and discovery.
    pub metadata_addr: http::uri::Authority,
    pub allow_route_regexp: routes::AllowList,
    pub require_imdsv2: bool,
    /// How long a request from an IP not yet known waits for the pod watch.
    pub backoff_max_elapsed_time: Duration,
    /// Record Kubernetes Events on pods that get no credentials.
    pub pod_events: bool,
    /// `--max-connections`, `--max-connections-per-ip`, `--header-read-timeout`.
    pub limits: crate::http::Limits,
    pub shutdown_grace_period: Duration,
}
