//! STS flags: sessions, failures, timeouts, concurrency, the endpoint.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::FlagError;
use super::values::{parse_duration, parse_rate};
use crate::credentials::{BudgetSettings, StsSettings};
use crate::policy::RoleArn;
use crate::resolve::{SessionOptions, SessionRules, SessionScope, SessionTagging, valid_tag_value};

/// Shortest `--iam-role-session-ttl`: credentials handed out keep at least this long, which is
/// the window in which the Java SDK refetches on every call (kiam #191).
const MIN_SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest `--iam-role-session-ttl`: sessions last twice the TTL, and STS caps them at 12 h.
const MAX_SESSION_TTL: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "STS")]
pub struct StsArgs {
    /// Refresh credentials once less than this remains; sessions last twice as long.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub iam_role_session_ttl: Duration,

    /// How long a failed AssumeRole is remembered before STS is asked again.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub iam_role_error_ttl: Duration,

    /// Call STS at the region's endpoint instead of the global one.
    #[arg(long)]
    pub use_regional_sts_endpoint: bool,

    /// Longest wait for STS when a request finds no cached credentials.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub sts_timeout: Duration,

    /// Most STS AssumeRole calls in flight at once. Prefetches and refreshes take a quarter
    /// of them at most: a pod's request, which goes first, finds a free one.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub sts_concurrency: u16,

    /// The node's budget of AssumeRole calls per second over time, retries included: STS
    /// limits calls per account and region (about 600/s), and every node of the cluster
    /// calls it. A pod's request takes the next call before refreshes and prefetches, which
    /// also keep to a pace that starts at this rate and halves whenever STS throttles.
    #[arg(long, default_value_t = 10.0, value_parser = parse_rate, env = "IAMLET_STS_MAX_RPS")]
    pub sts_max_rps: f64,

    /// The most AssumeRole calls the node makes at once after a quiet spell (the budget's
    /// burst): a node's new pods, or a restart, are fetched at once up to this many.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000), env = "IAMLET_STS_BURST")]
    pub sts_burst: u32,

    /// Which pods share one STS session: `pod` (one each, named `<namespace>.<pod>`),
    /// `service-account` (one per role, namespace and ServiceAccount on the node, named
    /// `<namespace>@<serviceaccount>`) or `role` (one per role on the node, named
    /// `iamlet@<node>`, as kube2iam). Wider scopes make fewer AssumeRole calls (STS limits
    /// them per account); the audit log still joins each AccessKeyId to its pods.
    #[arg(long, value_enum, default_value_t = SessionScopeArg::Pod, env = "IAMLET_SESSION_SCOPE")]
    pub session_scope: SessionScopeArg,

    /// Tag each AssumeRole with the pod's attributes under EKS Pod Identity's keys
    /// (kubernetes-namespace, kubernetes-service-account, kubernetes-pod-name,
    /// kubernetes-pod-uid; eks-cluster-name with --cluster-name), all transitive, as far as the
    /// session scope shares them (no pod's name or uid in a shared session). The roles' trust
    /// policies must allow sts:TagSession.
    #[arg(long)]
    pub session_tags: bool,

    /// Set each AssumeRole's SourceIdentity to `<namespace>@<serviceaccount>` of the pod:
    /// unlike the session name it survives role chaining, and CloudTrail shows it on every
    /// call the pod's credentials make. The roles' trust policies must allow
    /// sts:SetSourceIdentity, or every AssumeRole fails.
    #[arg(long)]
    pub source_identity: bool,

    /// The cluster's name, sent as the eks-cluster-name session tag (with --session-tags).
    #[arg(long)]
    pub cluster_name: Option<String>,

    /// An intermediate role (a full ARN), as kiam's flag: iamlet assumes it with its own
    /// credentials, renews that session ahead of expiry, and assumes the pods' roles with it.
    /// The node role then needs sts:AssumeRole on this role only.
    #[arg(long)]
    pub assume_role_arn: Option<String>,
}

/// `--session-scope` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionScopeArg {
    Pod,
    ServiceAccount,
    Role,
}

impl From<SessionScopeArg> for SessionScope {
    fn from(arg: SessionScopeArg) -> Self {
        match arg {
            SessionScopeArg::Pod => SessionScope::Pod,
            SessionScopeArg::ServiceAccount => SessionScope::ServiceAccount,
            SessionScopeArg::Role => SessionScope::Role,
        }
    }
}

impl StsArgs {
    pub fn settings(self) -> Result<StsSettings, FlagError> {
        let flag = |flag: &'static str, message: String| FlagError { flag, message };
        if !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&self.iam_role_session_ttl) {
            return Err(flag(
                "--iam-role-session-ttl",
                format!(
                    "{} is out of range: it must be between 15m and 6h (sessions last twice the TTL; STS allows 15m to 12h)",
                    humantime::format_duration(self.iam_role_session_ttl)
                ),
            ));
        }
        if self.iam_role_error_ttl > Duration::from_secs(3600) {
            return Err(flag("--iam-role-error-ttl", "must be at most 1h".into()));
        }
        if self.sts_timeout.is_zero() {
            return Err(flag("--sts-timeout", "must be greater than 0".into()));
        }
        let session_tags = match (self.session_tags, self.cluster_name.as_deref().map(str::trim)) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(flag("--cluster-name", "is sent only as a session tag: add --session-tags".into()));
            }
            (true, Some("")) => return Err(flag("--cluster-name", "is empty".into())),
            (true, Some(name)) if !valid_tag_value(name) => {
                return Err(flag(
                    "--cluster-name",
                    format!(
                        "{name:?} cannot be a session tag value: at most 256 letters, digits, spaces and _ . : / = + - @"
                    ),
                ));
            }
            (true, name) => Some(SessionTagging { cluster_name: name.map(str::to_string) }),
        };
        let scope = SessionScope::from(self.session_scope);
        if self.source_identity && scope == SessionScope::Role {
            return Err(flag(
                "--source-identity",
                "cannot be combined with --session-scope=role: a session shared by every pod of a role on the node \
                 cannot carry one pod's ServiceAccount; use --session-scope=service-account or pod"
                    .into(),
            ));
        }
        let assume_role_arn = match self.assume_role_arn.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(arn) => Some(RoleArn::parse(arn).map_err(|e| {
                flag("--assume-role-arn", format!("{arn:?} is not a role ARN: {e} (a full ARN, as kiam takes it)"))
            })?),
        };
        Ok(StsSettings {
            assume_role_arn,
            sessions: SessionOptions { scope, tagging: session_tags, source_identity: self.source_identity },
            iam_role_session_ttl: SessionRules::new(self.iam_role_session_ttl),
            iam_role_error_ttl: self.iam_role_error_ttl,
            sts_timeout: self.sts_timeout,
            sts_concurrency: self.sts_concurrency.into(),
            sts_budget: BudgetSettings { rate: self.sts_max_rps, burst: self.sts_burst.into() },
            use_regional_sts_endpoint: self.use_regional_sts_endpoint,
        })
    }
}
