//! The STS flag group's settings: how sessions are asked for, how failures and slow calls are
//! handled, and who the pods' roles are assumed as.

use std::time::Duration;

use super::budget::BudgetSettings;
use super::sts::StsClientSettings;
use crate::policy::RoleArn;
use crate::resolve::{SessionOptions, SessionRules, SessionScope};

/// STS and the cache in front of it, from the STS flags.
#[derive(Debug, Clone)]
pub struct StsSettings {
    /// How long sessions last and when they are refreshed (`--iam-role-session-ttl`).
    pub iam_role_session_ttl: SessionRules,
    /// How long a failed AssumeRole is remembered (zero: not at all).
    pub iam_role_error_ttl: Duration,
    /// Longest wait for one AssumeRole, and for a request whose credentials are not cached.
    pub sts_timeout: Duration,
    /// Most AssumeRole calls in flight at once: a node full of new pods (or a restart on a
    /// busy node) prefetches without a burst of connections or STS throttling.
    pub sts_concurrency: usize,
    /// `--sts-max-rps` and `--sts-burst`: the node's budget of calls, retries included.
    pub sts_budget: BudgetSettings,
    /// Call the region's STS endpoint rather than the global one.
    pub use_regional_sts_endpoint: bool,
    /// `--session-scope`, `--session-tags` (with `--cluster-name`) and `--source-identity`:
    /// which pods share a session, and what it carries.
    pub sessions: SessionOptions,
    /// `--assume-role-arn`: the intermediate role the pods' roles are assumed with.
    pub assume_role_arn: Option<RoleArn>,
}

impl StsSettings {
    /// Says at startup what the STS flags change from plain AssumeRole: the intermediate
    /// role, session tags, and a session TTL lowered to fit STS's role-chaining cap.
    pub fn announce(&self) {
        if let Some(role) = &self.assume_role_arn {
            tracing::info!(%role, "pods' roles are assumed with this intermediate role's session (--assume-role-arn)");
        }
        if let Some(tagging) = &self.sessions.tagging {
            tracing::info!(
                cluster_name = tagging.cluster_name.as_deref(),
                scope = %self.sessions.scope,
                "sessions carry the tags their pods share (--session-tags)"
            );
        }
        if self.sessions.scope != SessionScope::Pod {
            tracing::info!(
                scope = %self.sessions.scope,
                "pods share sessions (--session-scope): CloudTrail names the shared session; the audit log \
                 (target iamlet::audit) joins each AccessKeyId to the pods handed it"
            );
        }
        if let Some(requested) = self.iam_role_session_ttl.lowered_from() {
            tracing::warn!(
                requested = %humantime::format_duration(requested),
                used = %humantime::format_duration(self.iam_role_session_ttl.refresh_before()),
                "--iam-role-session-ttl is lowered: STS caps role-chained sessions (an instance profile's, IRSA's) at \
                 1h and sessions last twice the TTL; credentials are refreshed with this much left"
            );
        }
    }

    /// How the STS client of the agent on `node` is built.
    pub fn client(&self, node: &str) -> StsClientSettings {
        StsClientSettings {
            regional: self.use_regional_sts_endpoint,
            timeout: self.sts_timeout,
            intermediate_role: self.assume_role_arn.clone(),
            node: node.to_string(),
        }
    }
}
