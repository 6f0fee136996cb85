//! The command line: kube2iam's flag names and meanings, validated into a [`Config`].
//!
//! Existing kube2iam DaemonSets must keep working when only the image changes, so flags keep
//! kube2iam's names, defaults where they are safe, and Go's `--flag=true` form for booleans.
//! Every value is checked here, before anything starts, and a bad one is reported as one line
//! naming the flag.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::StartupError;
use crate::cluster::taint::DEFAULT_STARTUP_TAINT;
use crate::imds::routes::{AllowList, DEFAULT_ALLOW_ROUTE_REGEXP};
use crate::netfilter::lifecycle::KeepOnExit;
use crate::netfilter::{BackendChoice, InterfaceMatch, InterfaceSetting};
use crate::policy::{BaseArn, RestrictionFormat, RoleArn};

/// `iamlet`: give each pod on this node the IAM role named in its annotation.
#[derive(Debug, Parser)]
#[command(name = "iamlet", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// Subcommands; without one, iamlet runs the agent.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Remove every rule iamlet installed (IPv4 and IPv6, nft and legacy backends), e.g.
    /// after a crash or `kill -9`. Safe to run on a node without iamlet's rules.
    Cleanup,
    /// Say which role a pod gets and why, or why not, with the agent's own flags.
    Explain(Box<ExplainArgs>),
}

/// `iamlet explain <namespace>/<pod> [--check-sts] [agent flags]`.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The pod, as `namespace/name`.
    #[arg(value_name = "NAMESPACE/POD")]
    pub target: String,
    /// Also try AssumeRole with the agent's AWS configuration.
    #[arg(long)]
    pub check_sts: bool,
    /// The agent's flags, so the answer is the agent's (`--node` is not needed).
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// The agent's flags. Names and meanings follow kube2iam; differences are in the README.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Port the metadata API listens on (the DNAT target).
    #[arg(long, default_value_t = 8181)]
    pub app_port: u16,

    /// Address the metadata API listens on and the DNAT target; all addresses when unset.
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,

    /// The agent's IPv6 address, for pods on IPv6 or dual-stack networks ([fd00:ec2::254]).
    #[arg(long, env = "HOST_IPV6")]
    pub host_ipv6: Option<Ipv6Addr>,

    /// Interfaces pod traffic arrives on (`cali+`, `eni+,vlan+`, `!eth0`, `cni0`, `weave`,
    /// `lxc+`), or `auto` to detect the CNI's from its configuration.
    #[arg(long, default_value = "auto", env = "IAMLET_HOST_INTERFACE")]
    pub host_interface: String,

    /// Where the CNI's configuration is, for `--host-interface=auto`.
    #[arg(long, default_value = "/etc/cni/net.d", env = "IAMLET_CNI_CONF_DIR")]
    pub cni_conf_dir: PathBuf,

    /// Taint removed from this node once iamlet's rules are in place and it is ready, so
    /// nodes registered with it run no pod before they are protected; empty disables.
    #[arg(long, default_value = DEFAULT_STARTUP_TAINT)]
    pub startup_taint: String,

    /// Install the DNAT rule that sends pod metadata traffic to iamlet.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub iptables: bool,

    /// How often iamlet checks its rules and repairs them if they were changed or removed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub iptables_sync_period: Duration,

    /// Keep the rules when iamlet exits: `auto` keeps them while its DaemonSet will run a
    /// successor here (a restart) and removes them on uninstall; `true` always keeps them
    /// (`iamlet cleanup` removes them); `false` always removes them.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_value = "auto",
        default_missing_value = "true",
        value_parser = KeepOnExit::parse,
        env = "IAMLET_IPTABLES_KEEP_ON_EXIT"
    )]
    pub iptables_keep_on_exit: KeepOnExit,

    /// iptables backend: `auto` (the one kube-proxy uses on this node), `nft` or `legacy`.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub iptables_backend: BackendArg,

    /// ARN prefix joined to bare role names, e.g. `arn:aws:iam::123456789012:role/`.
    #[arg(long)]
    pub base_role_arn: Option<String>,

    /// Discover the base role ARN from the node's instance profile (IMDS `iam/info`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub auto_discover_base_arn: bool,

    /// Role for pods without the role annotation; none when unset.
    #[arg(long)]
    pub default_role: Option<String>,

    /// Use the node's own instance role as the default role (and discover the base ARN).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub auto_discover_default_role: bool,

    /// Pod annotation that names the role.
    #[arg(long, default_value = "iam.amazonaws.com/role")]
    pub iam_role_key: String,

    /// Pod annotation that holds the external ID passed to AssumeRole.
    #[arg(long, default_value = "iam.amazonaws.com/external-id")]
    pub iam_external_id: String,

    /// Refresh credentials once less than this remains; sessions last twice as long.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub iam_role_session_ttl: Duration,

    /// How long a failed AssumeRole is remembered before STS is asked again.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub iam_role_error_ttl: Duration,

    /// Only allow the roles listed in the namespace's `--namespace-key` annotation.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub namespace_restrictions: bool,

    /// How entries of the namespace annotation are matched: `glob` or `regexp` (anchored).
    #[arg(long, value_enum, default_value_t = RestrictionFormatArg::Glob)]
    pub namespace_restriction_format: RestrictionFormatArg,

    /// Namespace annotation that lists the roles its pods may use (a JSON list).
    #[arg(long, default_value = "iam.amazonaws.com/allowed-roles")]
    pub namespace_key: String,

    /// Name of this node: only its pods are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,

    /// Path to a kubeconfig; in-cluster configuration when unset.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API server URL (overrides the kubeconfig's).
    #[arg(long)]
    pub api_server: Option<String>,

    /// Bearer token for the API server.
    #[arg(long, env = "IAMLET_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Skip TLS verification of the API server (testing only).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub insecure: bool,

    /// The node's real metadata service, `host[:port]`, for allow-listed paths and discovery.
    #[arg(long, default_value = "169.254.169.254")]
    pub metadata_addr: String,

    /// Call STS at the region's endpoint instead of the global one.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub use_regional_sts_endpoint: bool,

    /// How long a request from an IP not yet known waits for the pod watch.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub backoff_max_elapsed_time: Duration,

    /// How long the pod watch may fail before `/readyz` says not ready (pods already known
    /// keep being served; new pods and changes are not seen meanwhile).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pod_watch_stale_after: Duration,

    /// Accepted for kube2iam compatibility and ignored: waits are event-driven.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub backoff_max_interval: Option<Duration>,

    /// Accepted for kube2iam compatibility and ignored: IP reuse is always resolved.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub resolve_duplicate_cache_ips: Option<bool>,

    /// Refuse IMDSv1: every request must carry a valid IMDSv2 token.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub require_imdsv2: bool,

    /// Regular expression of the (whole) paths relayed to the real metadata service; others
    /// get 404. It can only add harmless paths: credentials are always iamlet's, and the
    /// node's identity (user-data, identity credentials, signed documents, iam/info) is
    /// never relayed.
    #[arg(long, default_value = DEFAULT_ALLOW_ROUTE_REGEXP)]
    pub allow_route_regexp: String,

    /// Port of the admin endpoints (/healthz, /readyz, /metrics, /debug/store).
    #[arg(long, default_value_t = 8182)]
    pub metrics_port: u16,

    /// Record a Kubernetes Event on a pod that is denied its role or whose role STS refuses
    /// (needs RBAC to create events).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub pod_events: bool,

    /// Serve /debug/store on the admin port.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub debug: bool,

    /// Log format: `text` or `json`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level: trace, debug, info, warn, error (kube2iam's fatal and panic mean error).
    #[arg(long, default_value = "info", value_parser = parse_log_level)]
    pub log_level: tracing::Level,

    /// Debug logging (same as `--log-level=debug`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub verbose: bool,

    /// Longest wait for STS when a request finds no cached credentials.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub sts_timeout: Duration,

    /// Most STS AssumeRole calls in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub sts_concurrency: u16,

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

/// `--namespace-restriction-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestrictionFormatArg {
    Glob,
    Regexp,
}

/// `--iptables-backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Auto,
    Nft,
    Legacy,
}

impl From<BackendArg> for BackendChoice {
    fn from(arg: BackendArg) -> Self {
        match arg {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Nft => BackendChoice::Nft,
            BackendArg::Legacy => BackendChoice::Legacy,
        }
    }
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the base role ARN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseArnSource {
    /// No base ARN: annotations must hold full ARNs.
    None,
    /// `--base-role-arn`.
    Given(BaseArn),
    /// `--auto-discover-base-arn` or `--auto-discover-default-role`: read from IMDS at startup.
    Discover,
}

/// Where the default role comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRoleSource {
    None,
    /// `--default-role`, a name or an ARN, resolved once the base ARN is known.
    Given(String),
    /// `--auto-discover-default-role`: the node's own instance role.
    Discover,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub app_port: u16,
    pub host_ip: Option<IpAddr>,
    pub host_ipv6: Option<Ipv6Addr>,
    pub host_interface: InterfaceSetting,
    pub cni_conf_dir: PathBuf,
    /// `--startup-taint`, unless empty.
    pub startup_taint: Option<String>,
    pub iptables: bool,
    pub iptables_sync_period: Duration,
    pub iptables_keep_on_exit: KeepOnExit,
    pub iptables_backend: BackendChoice,
    pub base_arn: BaseArnSource,
    pub default_role: DefaultRoleSource,
    pub role_annotation: String,
    pub external_id_annotation: String,
    pub session_ttl: Duration,
    pub error_ttl: Duration,
    pub namespace_restrictions: Option<RestrictionFormat>,
    pub namespace_annotation: String,
    pub node: String,
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub api_token: Option<String>,
    pub insecure: bool,
    pub metadata_authority: http::uri::Authority,
    pub use_regional_sts_endpoint: bool,
    pub pod_wait: Duration,
    pub pod_watch_stale_after: Duration,
    pub require_imdsv2: bool,
    pub allow_route: AllowList,
    pub metrics_port: u16,
    pub debug: bool,
    pub pod_events: bool,
    pub log_format: LogFormat,
    pub log_level: tracing::Level,
    pub sts_timeout: Duration,
    pub sts_concurrency: u16,
    pub shutdown_grace: Duration,
    pub connection_limits: crate::http::Limits,
}

/// Shortest `--iam-role-session-ttl`: credentials handed out keep at least this long, which is
/// the window in which the Java SDK refetches on every call (kiam #191).
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest `--iam-role-session-ttl`: sessions last twice the TTL, and STS caps them at 12 h.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(6 * 3600);

impl AgentArgs {
    /// Checks every value and combination, returning the first problem as a flag error.
    pub fn validate(self) -> Result<Config, StartupError> {
        let flag = |flag: &'static str, message: String| StartupError::Flag { flag, message };

        if self.default_role.is_some() && self.auto_discover_default_role {
            return Err(flag("--auto-discover-default-role", "cannot be combined with --default-role; use one".into()));
        }
        // kube2iam's default is the empty string: `--base-role-arn=` means none.
        let base_role_arn = self.base_role_arn.as_deref().map(str::trim).filter(|text| !text.is_empty());
        if base_role_arn.is_some() && self.auto_discover_base_arn {
            return Err(flag("--auto-discover-base-arn", "cannot be combined with --base-role-arn; use one".into()));
        }
        let base_arn = match (base_role_arn, self.auto_discover_base_arn || self.auto_discover_default_role) {
            (Some(text), _) => {
                BaseArnSource::Given(BaseArn::parse(text).map_err(|e| flag("--base-role-arn", e.to_string()))?)
            }
            (None, true) => BaseArnSource::Discover,
            (None, false) => BaseArnSource::None,
        };
        let default_role = match (&self.default_role, self.auto_discover_default_role) {
            (Some(role), _) => {
                let role = role.trim();
                if role.is_empty() {
                    return Err(flag("--default-role", "is empty".into()));
                }
                if role.starts_with("arn:") {
                    RoleArn::parse(role).map_err(|e| flag("--default-role", e.to_string()))?;
                } else if base_arn == BaseArnSource::None {
                    return Err(flag(
                        "--default-role",
                        format!(
                            "{role:?} is a bare role name: give a full ARN, or --base-role-arn / --auto-discover-base-arn"
                        ),
                    ));
                }
                DefaultRoleSource::Given(role.to_string())
            }
            (None, true) => DefaultRoleSource::Discover,
            (None, false) => DefaultRoleSource::None,
        };
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
        if self.backoff_max_elapsed_time > Duration::from_secs(30) {
            return Err(flag(
                "--backoff-max-elapsed-time",
                "must be at most 30s: SDKs give up on the metadata service long before".into(),
            ));
        }
        if self.sts_timeout.is_zero() {
            return Err(flag("--sts-timeout", "must be greater than 0".into()));
        }
        for (name, key) in [
            ("--iam-role-key", &self.iam_role_key),
            ("--iam-external-id", &self.iam_external_id),
            ("--namespace-key", &self.namespace_key),
        ] {
            if key.trim().is_empty() {
                return Err(flag(name, "annotation key is empty".into()));
            }
        }
        let node = match self.node.as_deref().map(str::trim) {
            Some(node) if !node.is_empty() => node.to_string(),
            _ => {
                return Err(flag("--node", "is required (or NODE_NAME, from the downward API's spec.nodeName)".into()));
            }
        };
        let metadata_authority =
            parse_metadata_addr(&self.metadata_addr).map_err(|message| flag("--metadata-addr", message))?;
        let allow_route =
            AllowList::new(&self.allow_route_regexp).map_err(|e| flag("--allow-route-regexp", e.to_string()))?;
        if self.app_port == 0 || self.metrics_port == 0 {
            let which = if self.app_port == 0 { "--app-port" } else { "--metrics-port" };
            return Err(flag(which, "port 0 is not allowed".into()));
        }
        if self.app_port == self.metrics_port {
            return Err(flag(
                "--metrics-port",
                format!("must differ from --app-port ({}): admin endpoints are never served to pods", self.app_port),
            ));
        }
        if let Some(url) = &self.api_server {
            url.parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.scheme().is_some() && uri.host().is_some())
                .ok_or_else(|| flag("--api-server", format!("{url:?} is not a URL like https://10.0.0.1:6443")))?;
        }
        if self.iptables && self.host_ip.is_none() {
            return Err(flag(
                "--host-ip",
                "is required with --iptables: it is where pod traffic is sent (HOST_IP from status.hostIP)".into(),
            ));
        }
        let host_interface = match self.host_interface.trim() {
            "auto" => InterfaceSetting::Auto,
            text => InterfaceSetting::Given(
                InterfaceMatch::parse(text).map_err(|message| flag("--host-interface", message))?,
            ),
        };
        let startup_taint = match self.startup_taint.trim() {
            "" => None,
            key => Some(parse_taint_key(key).map_err(|message| flag("--startup-taint", message))?),
        };
        if self.host_ipv6.is_some() && self.host_ip.is_some_and(|ip| ip.is_ipv6()) {
            return Err(flag(
                "--host-ipv6",
                "--host-ip is already IPv6; give --host-ip the node's IPv4 address".into(),
            ));
        }
        if self.header_read_timeout < Duration::from_millis(100) || self.header_read_timeout > Duration::from_secs(60) {
            return Err(flag("--header-read-timeout", "must be between 100ms and 60s".into()));
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(flag("--max-connections-per-ip", "cannot exceed --max-connections".into()));
        }
        if self.iptables_sync_period < Duration::from_secs(1) {
            return Err(flag("--iptables-sync-period", "must be at least 1s".into()));
        }
        let log_level = if self.verbose { tracing::Level::DEBUG.max(self.log_level) } else { self.log_level };

        Ok(Config {
            app_port: self.app_port,
            host_ip: self.host_ip,
            host_ipv6: self.host_ipv6,
            host_interface,
            cni_conf_dir: self.cni_conf_dir,
            startup_taint,
            iptables: self.iptables,
            iptables_sync_period: self.iptables_sync_period,
            iptables_keep_on_exit: self.iptables_keep_on_exit,
            iptables_backend: self.iptables_backend.into(),
            base_arn,
            default_role,
            role_annotation: self.iam_role_key,
            external_id_annotation: self.iam_external_id,
            session_ttl: self.iam_role_session_ttl,
            error_ttl: self.iam_role_error_ttl,
            namespace_restrictions: self.namespace_restrictions.then_some(match self.namespace_restriction_format {
                RestrictionFormatArg::Glob => RestrictionFormat::Glob,
                RestrictionFormatArg::Regexp => RestrictionFormat::Regexp,
            }),
            namespace_annotation: self.namespace_key,
            node,
            kubeconfig: self.kubeconfig,
            api_server: self.api_server,
            api_token: self.api_token,
            insecure: self.insecure,
            metadata_authority,
            use_regional_sts_endpoint: self.use_regional_sts_endpoint,
            pod_wait: self.backoff_max_elapsed_time,
            pod_watch_stale_after: self.pod_watch_stale_after,
            require_imdsv2: self.require_imdsv2,
            allow_route,
            metrics_port: self.metrics_port,
            debug: self.debug,
            pod_events: self.pod_events,
            log_format: self.log_format,
            log_level,
            sts_timeout: self.sts_timeout,
            sts_concurrency: self.sts_concurrency,
            shutdown_grace: self.shutdown_grace_period,
            connection_limits: crate::http::Limits {
                connections: self.max_connections as usize,
                connections_per_ip: self.max_connections_per_ip as usize,
                header_read_timeout: self.header_read_timeout,
                ..crate::http::Limits::default()
            },
        })
    }
}

/// A taint key: a qualified name (`[prefix/]name`), as the API server validates it.
fn parse_taint_key(key: &str) -> Result<String, String> {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    if name_ok && prefix_ok {
        Ok(key.to_string())
    } else {
        Err(format!("{key:?} is not a taint key like iamlet.io/agent-not-ready"))
    }
}

/// Go-style durations (`15m`, `2s`, `1h30m`), as kube2iam takes them.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 30s, 15m or 1h ({e})"))
}

fn parse_log_level(text: &str) -> Result<tracing::Level, String> {
    match text.to_ascii_lowercase().as_str() {
        "trace" => Ok(tracing::Level::TRACE),
        "debug" => Ok(tracing::Level::DEBUG),
        "info" => Ok(tracing::Level::INFO),
        "warn" | "warning" => Ok(tracing::Level::WARN),
        "error" | "fatal" | "panic" => Ok(tracing::Level::ERROR),
        _ => Err(format!("{text:?} is not one of trace, debug, info, warn, error")),
    }
}

/// `host[:port]`, an IP or a name; the port defaults to 80. A scheme is tolerated
/// (`http://169.254.169.254`) since kube2iam configurations sometimes carry one.
fn parse_metadata_addr(text: &str) -> Result<http::uri::Authority, String> {
    let trimmed = text.trim().trim_start_matches("http://").trim_end_matches('/');
    if trimmed.is_empty() || trimmed.contains('/') {
        return Err(format!("{text:?} is not host[:port]"));
    }
    let authority: http::uri::Authority = trimmed.parse().map_err(|_| format!("{text:?} is not host[:port]"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{text:?} is not host[:port]"));
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["iamlet", "--node=node-a"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.agent.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_kube2iam_where_safe() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.app_port, 8181);
        assert_eq!(config.metrics_port, 8182);
        assert_eq!(config.role_annotation, "iam.amazonaws.com/role");
        assert_eq!(config.external_id_annotation, "iam.amazonaws.com/external-id");
        assert_eq!(config.namespace_annotation, "iam.amazonaws.com/allowed-roles");
        assert_eq!(config.session_ttl, Duration::from_secs(1800));
        assert_eq!(config.pod_wait, Duration::from_secs(2));
        assert_eq!(config.metadata_authority.as_str(), "169.254.169.254");
        assert!(config.namespace_restrictions.is_none());
        assert_eq!(config.iptables_keep_on_exit, KeepOnExit::Auto);
        assert_eq!(config.startup_taint.as_deref(), Some("iamlet.io/agent-not-ready"));
        assert_eq!(config.host_interface, InterfaceSetting::Auto);
        assert_eq!(config.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
    }

    #[test]
    fn keep_on_exit_takes_auto_and_go_booleans() {
        assert_eq!(parse(&["--iptables-keep-on-exit"]).unwrap().iptables_keep_on_exit, KeepOnExit::Always);
        assert_eq!(parse(&["--iptables-keep-on-exit=false"]).unwrap().iptables_keep_on_exit, KeepOnExit::Never);
        assert_eq!(parse(&["--iptables-keep-on-exit=auto"]).unwrap().iptables_keep_on_exit, KeepOnExit::Auto);
        assert!(parse(&["--startup-taint="]).unwrap().startup_taint.is_none(), "empty disables");
        let aws = parse(&["--host-interface=eni+,vlan+"]).unwrap().host_interface;
        assert_eq!(aws, InterfaceSetting::Given(InterfaceMatch::parse("eni+,vlan+").unwrap()));
    }

    #[test]
    fn go_style_booleans_are_accepted() {
        let config = parse(&["--iptables=true", "--host-ip=10.0.0.5", "--namespace-restrictions"]).unwrap();
        assert!(config.iptables);
        assert_eq!(config.namespace_restrictions, Some(RestrictionFormat::Glob));
        assert!(!parse(&["--require-imdsv2=false"]).unwrap().require_imdsv2);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--base-role-arn=arn:aws:s3:::bucket"], "--base-role-arn"),
            (
                &["--base-role-arn=arn:aws:iam::123456789012:role/", "--auto-discover-base-arn"],
                "--auto-discover-base-arn",
            ),
            (&["--iam-role-session-ttl=0s"], "--iam-role-session-ttl"),
            (&["--iam-role-session-ttl=7h"], "--iam-role-session-ttl"),
            (&["--default-role=app"], "--default-role"),
            (&["--default-role=arn:aws:iam::12:role/x"], "--default-role"),
            (&["--metadata-addr=http://x/y"], "--metadata-addr"),
            (&["--allow-route-regexp=("], "--allow-route-regexp"),
            (&["--metrics-port=8181"], "--metrics-port"),
            (&["--api-server=not a url"], "--api-server"),
            (&["--iptables"], "--host-ip"),
            (&["--iam-role-key="], "--iam-role-key"),
            (&["--host-interface=eth 0"], "--host-interface"),
            (&["--host-ip=fd00::1", "--host-ipv6=fd00::2"], "--host-ipv6"),
            (&["--iptables-sync-period=10ms"], "--iptables-sync-period"),
            (&["--host-interface=!eth0,eni+"], "--host-interface"),
            (&["--startup-taint=not a key"], "--startup-taint"),
            (&["--iptables-keep-on-exit=maybe"], "--iptables-keep-on-exit"),
        ];
        for (args, flag) in cases {
            let error = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert!(error.contains(flag), "{args:?}: {error:?} should name {flag}");
        }
    }

    #[test]
    fn clap_level_errors_name_their_flag() {
        for (args, flag) in [
            (vec!["--log-format=xml"], "--log-format"),
            (vec!["--log-level=loud"], "--log-level"),
            (vec!["--iam-role-session-ttl=soon"], "--iam-role-session-ttl"),
            (vec!["--app-port=99999"], "--app-port"),
        ] {
            let error = parse(&args).unwrap_err();
            assert!(error.contains(flag), "{error}");
        }
    }

    #[test]
    fn node_is_required() {
        let mut cli = Cli::try_parse_from(["iamlet"]).unwrap();
        cli.agent.node = None; // whatever NODE_NAME the test runner has
        assert!(cli.agent.validate().unwrap_err().to_string().contains("--node"));
    }

    #[test]
    fn bare_default_role_needs_a_base() {
        let config = parse(&["--default-role=app", "--base-role-arn=arn:aws:iam::123456789012:role"]).unwrap();
        assert_eq!(config.default_role, DefaultRoleSource::Given("app".into()));
        let config = parse(&["--auto-discover-default-role"]).unwrap();
        assert_eq!(config.default_role, DefaultRoleSource::Discover);
        assert_eq!(config.base_arn, BaseArnSource::Discover);
    }

    #[test]
    fn metadata_addr_takes_host_and_port() {
        assert_eq!(parse_metadata_addr("127.0.0.1:9000").unwrap().port_u16(), Some(9000));
        assert_eq!(parse_metadata_addr("http://169.254.169.254/").unwrap().host(), "169.254.169.254");
        assert!(parse_metadata_addr("user@host").is_err());
    }

    #[test]
    fn verbose_means_debug() {
        assert_eq!(parse(&["--verbose"]).unwrap().log_level, tracing::Level::DEBUG);
        assert_eq!(parse(&["--log-level=fatal"]).unwrap().log_level, tracing::Level::ERROR);
    }
}
