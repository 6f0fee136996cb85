//! The metadata API pods see, on the app port.
//!
//! [`routes`] decides where a path goes, [`token`] issues and checks IMDSv2 tokens under the
//! key [`token_key`] keeps in the state directory, [`render`] shapes bodies like IMDS, [`upstream`] talks to the node's real IMDS, and
//! [`service`] puts them together for one request.

pub mod audit;
pub mod render;
pub mod routes;
pub mod service;
pub mod token;
pub mod token_key;
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
    /// Log each pod's credentials once, joining the AccessKeyId to the pod.
    pub credential_audit_log: bool,
    /// `--max-connections`, `--max-connections-per-ip`, `--header-read-timeout`.
    pub limits: crate::http::Limits,
    pub shutdown_grace_period: Duration,
}

impl ImdsSettings {
    /// Says at startup what is relayed to the node's metadata service beyond the default
    /// list (`--allow-route-regexp`), and which never-relayed paths the operator's regexp
    /// would match: they stay refused.
    pub fn announce(&self) {
        let allow = &self.allow_route_regexp;
        if allow.operator().is_some() || !allow.keeps_default() {
            let additions = allow.additions();
            tracing::info!(
                allow_route_regexp = allow.operator().unwrap_or_default(),
                default_list = if allow.keeps_default() { "kept" } else { "dropped (--allow-route-regexp-only)" },
                adds = %if additions.is_empty() { "no well-known path".to_string() } else { additions.join(", ") },
                "metadata paths relayed to the node's metadata service: the default harmless list and what \
                 --allow-route-regexp admits, each with or without a trailing slash"
            );
        }
        let overreach = allow.overreach();
        if !overreach.is_empty() {
            tracing::warn!(
                paths = %overreach.join(", "),
                "--allow-route-regexp matches paths that iamlet never relays (they identify or empower the node); \
                 they stay refused"
            );
        }
    }
}
