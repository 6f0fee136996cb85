//! Metadata API flags: the port pods reach, what is relayed, tokens, waits and limits.

use std::time::Duration;

use clap::Args;

use super::FlagError;
use super::values::{parse_duration, parse_go_bool, parse_metadata_addr};
use crate::imds::ImdsSettings;
use crate::imds::routes::AllowList;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Metadata API")]
pub struct ImdsArgs {
    /// Port the metadata API listens on (the DNAT target).
    #[arg(long, default_value_t = 8181)]
    pub app_port: u16,

    /// The node's real metadata service, `host[:port]`, for allow-listed paths and discovery.
    #[arg(long, default_value = "169.254.169.254")]
    pub metadata_addr: String,

    /// Regular expression of (whole) paths relayed to the real metadata service on top of
    /// the default harmless ones (region, instance type, VPC lookups, Spot notices); others
    /// get 404. It can only add harmless paths: credentials are always iamlet's, and the
    /// node's identity (user-data, identity credentials, signed documents, iam/info) is
    /// never relayed. Empty: the default list alone.
    #[arg(long, default_value = "")]
    pub allow_route_regexp: String,

    /// Relay only what --allow-route-regexp admits, without the default harmless paths (an
    /// SDK that reads its region from the metadata service then needs AWS_REGION).
    #[arg(long)]
    pub allow_route_regexp_only: bool,

    /// Refuse IMDSv1: every request must carry a valid IMDSv2 token.
    #[arg(long)]
    pub require_imdsv2: bool,

    /// How long a request from an IP not yet known waits for the pod watch.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub backoff_max_elapsed_time: Duration,

    /// Accepted for kube2iam compatibility; no effect: waits are event-driven.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub backoff_max_interval: Option<Duration>,

    /// Accepted for kube2iam compatibility; no effect: IP reuse is always resolved.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub resolve_duplicate_cache_ips: Option<bool>,

    /// Record a Kubernetes Event on a pod that is denied its role or whose role STS refuses
    /// (needs RBAC to create events).
    #[arg(long)]
    pub pod_events: bool,

    /// Log, once per pod and AccessKeyId, which pod was handed which credentials (namespace,
    /// name, uid, ServiceAccount, role, session): CloudTrail names the AccessKeyId behind each
    /// call, and this finds the pod. `--credential-audit-log=false` switches it off.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool, env = "IAMLET_CREDENTIAL_AUDIT_LOG")]
    pub credential_audit_log: bool,

    /// Most metadata API connections open at once, from all pods.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Most metadata API connections open at once from one source IP (one pod).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_ip: u32,

    /// Longest wait for a request's headers (idle keep-alive connections included).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,
}

impl ImdsArgs {
    pub fn settings(self) -> Result<ImdsSettings, FlagError> {
        let flag = |flag: &'static str, message: String| FlagError { flag, message };
        if self.app_port == 0 {
            return Err(flag("--app-port", "port 0 is not allowed".into()));
        }
        if self.backoff_max_elapsed_time > Duration::from_secs(30) {
            return Err(flag(
                "--backoff-max-elapsed-time",
                "must be at most 30s: SDKs give up on the metadata service long before".into(),
            ));
        }
        if self.header_read_timeout < Duration::from_millis(100) || self.header_read_timeout > Duration::from_secs(60) {
            return Err(flag("--header-read-timeout", "must be between 100ms and 60s".into()));
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(flag("--max-connections-per-ip", "cannot exceed --max-connections".into()));
        }
        Ok(ImdsSettings {
            app_port: self.app_port,
            metadata_addr: parse_metadata_addr(&self.metadata_addr).map_err(|m| flag("--metadata-addr", m))?,
            allow_route_regexp: AllowList::new(&self.allow_route_regexp, self.allow_route_regexp_only)
                .map_err(|e| flag("--allow-route-regexp", e.to_string()))?,
            require_imdsv2: self.require_imdsv2,
            backoff_max_elapsed_time: self.backoff_max_elapsed_time,
            pod_events: self.pod_events,
            credential_audit_log: self.credential_audit_log,
            limits: crate::http::Limits {
                connections: self.max_connections as usize,
                connections_per_ip: self.max_connections_per_ip as usize,
                header_read_timeout: self.header_read_timeout,
                ..crate::http::Limits::default()
            },
            shutdown_grace_period: self.shutdown_grace_period,
        })
    }
}
