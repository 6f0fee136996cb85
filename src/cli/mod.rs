//! The command line: kube2iam's flag names and meanings, grouped by the component they
//! configure, each group validated into that component's settings.
//!
//! Existing kube2iam DaemonSets must keep working when only the image changes, so flags keep
//! kube2iam's names, defaults where they are safe, and Go's `--flag=true` form for booleans
//! (see [`go_booleans`]). Every value is checked here, before anything starts, and a bad one
//! is reported as one line naming the flag. Each group's `settings()` yields its module's
//! settings type, whose field names are the flags'.

mod admin;
mod imds;
mod kube;
mod network;
mod roles;
mod sts;
mod values;

use std::ffi::OsString;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};

pub use admin::{AdminArgs, LogFormat, Logging};
pub use imds::ImdsArgs;
pub use kube::KubeArgs;
pub use network::{BackendArg, NetworkArgs};
pub use roles::{RestrictionFormatArg, RoleArgs};
pub use sts::StsArgs;

use crate::admin::AdminSettings;
use crate::cluster::client::KubeSettings;
use crate::credentials::StsSettings;
use crate::imds::ImdsSettings;
use crate::netfilter::NetworkSettings;
use crate::policy::PolicySettings;

/// A flag whose value is unusable: the agent does not start (exit code 2), and the one line
/// it prints names the flag and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {flag}: {message}")]
pub struct FlagError {
    /// The flag, with its dashes (`--base-role-arn`).
    pub flag: &'static str,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

/// `iamlet`: give each pod on this node the IAM role named in its annotation.
#[derive(Debug, Parser)]
#[command(name = "iamlet", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

impl Cli {
    /// Parses `args` (the program name first), booleans Go-style.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut matches = go_booleans(Self::command()).try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches)
    }
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
    /// The node explain runs on (the agent's NODE_NAME): on the pod's own node, explain also
    /// checks that the pod's traffic is intercepted.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// The agent's `--state-dir`, accepted so that the agent's flags can be passed as they
    /// are: explain keeps no state.
    #[arg(long, env = "IAMLET_STATE_DIR", hide = true)]
    pub state_dir: Option<std::path::PathBuf>,
    /// The agent's flags, so the answer is the agent's.
    #[command(flatten)]
    pub components: ComponentArgs,
}

/// The agent's flags: its node, and every component's.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub components: ComponentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Node")]
pub struct NodeArgs {
    /// Name of this node: only its pods are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,

    /// Root-only directory on the node for what outlives one iamlet process but not the
    /// node's boot: the IMDSv2 token key, so tokens stay valid across restarts and
    /// upgrades. Made 0700 if missing or looser; keep it on a tmpfs (`/run`).
    #[arg(long, env = "IAMLET_STATE_DIR", default_value = "/run/iamlet")]
    pub state_dir: std::path::PathBuf,
}

/// Every component's flags: what the agent and `explain` share.
#[derive(Debug, Clone, Args)]
pub struct ComponentArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub roles: RoleArgs,
    #[command(flatten)]
    pub sts: StsArgs,
    #[command(flatten)]
    pub imds: ImdsArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Every component's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kube: KubeSettings,
    /// `--pod-watch-stale-after`.
    pub pod_watch_stale_after: Duration,
    pub network: NetworkSettings,
    pub policy: PolicySettings,
    pub sts: StsSettings,
    pub imds: ImdsSettings,
    pub admin: AdminSettings,
    pub logging: Logging,
    /// kube2iam flags given that have no effect here, each logged once at startup.
    pub ignored_flags: Vec<IgnoredFlag>,
}

/// A kube2iam flag that was given and is accepted, and why it changes nothing in iamlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IgnoredFlag {
    pub flag: &'static str,
    pub why: &'static str,
}

impl IgnoredFlag {
    /// One startup line per kube2iam flag accepted without effect, with the reason.
    pub fn announce(flags: &[IgnoredFlag]) {
        for ignored in flags {
            tracing::info!(flag = ignored.flag, "kube2iam flag accepted without effect: {}", ignored.why);
        }
    }
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--node`.
    pub node: String,
    /// `--state-dir`.
    pub state_dir: std::path::PathBuf,
    pub settings: Settings,
}

impl AgentArgs {
    /// Checks every value and combination, returning the first problem as a flag error.
    pub fn validate(self) -> Result<Config, FlagError> {
        let node = match self.node.node.as_deref().map(str::trim) {
            Some(node) if !node.is_empty() => node.to_string(),
            _ => {
                return Err(FlagError {
                    flag: "--node",
                    message: "is required (or NODE_NAME, from the downward API's spec.nodeName)".into(),
                });
            }
        };
        let state_dir = self.node.state_dir;
        if !state_dir.is_absolute() {
            return Err(FlagError {
                flag: "--state-dir",
                message: format!("must be an absolute path, not {state_dir:?}"),
            });
        }
        Ok(Config { node, state_dir, settings: self.components.validate()? })
    }
}

impl ComponentArgs {
    /// Validates each group, then what spans groups.
    pub fn validate(self) -> Result<Settings, FlagError> {
        let ignored_flags = self.ignored_flags();
        let (kube, pod_watch_stale_after) = self.kube.settings()?;
        let policy = self.roles.settings()?;
        let sts = self.sts.settings()?;
        let imds = self.imds.settings()?;
        let (mut admin, logging) = self.admin.settings()?;
        let network = self.network.settings()?;
        if admin.metrics_port == Some(imds.app_port) {
            // kube2iam's chart passes one port for both; pods must never reach the admin
            // endpoints, so they are not served (the agent warns at startup).
            admin.metrics_port = None;
        }
        Ok(Settings { kube, pod_watch_stale_after, network, policy, sts, imds, admin, logging, ignored_flags })
    }

    /// The kube2iam flags given that iamlet accepts without effect.
    fn ignored_flags(&self) -> Vec<IgnoredFlag> {
        let given = [
            (
                self.kube.cache_resync_period.is_some(),
                IgnoredFlag {
                    flag: "--cache-resync-period",
                    why: "watches resume from their last resourceVersion and re-list on 410 Gone; no resync is needed",
                },
            ),
            (
                self.imds.resolve_duplicate_cache_ips.is_some(),
                IgnoredFlag {
                    flag: "--resolve-duplicate-cache-ips",
                    why: "an IP shared by two pods always resolves to the running one",
                },
            ),
            (
                self.imds.backoff_max_interval.is_some(),
                IgnoredFlag {
                    flag: "--backoff-max-interval",
                    why: "a request waits for the pod watch's event, not on a polling interval",
                },
            ),
        ];
        given.into_iter().filter_map(|(given, ignored)| given.then_some(ignored)).collect()
    }
}

/// Makes every boolean flag (and those of the subcommands) take Go's forms, as kube2iam's
/// do: `--iptables`, `--iptables=true`, `--iptables=1`, `--iptables=false`. Declared as plain
/// `bool` fields, they are switched here in one place.
pub fn go_booleans(mut command: clap::Command) -> clap::Command {
    let flags: Vec<clap::Id> = command
        .get_arguments()
        .filter(|arg| matches!(arg.get_action(), ArgAction::SetTrue))
        .map(|arg| arg.get_id().clone())
        .collect();
    for id in flags {
        command = command.mut_arg(id, |arg| {
            arg.action(ArgAction::Set)
                .num_args(0..=1)
                .require_equals(true)
                .default_value("false")
                .default_missing_value("true")
                .value_parser(values::parse_go_bool)
        });
    }
    let subcommands: Vec<String> = command.get_subcommands().map(|sub| sub.get_name().to_string()).collect();
    for name in subcommands {
        command = command.mut_subcommand(name, go_booleans);
    }
    command
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::netfilter::lifecycle::KeepOnExit;
    use crate::netfilter::{InterfaceMatch, InterfaceSetting};
    use crate::policy::{BaseArnSource, DefaultRoleSource, RestrictionFormat};

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["iamlet", "--node=node-a"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_args(argv).map_err(|e| e.to_string())?;
        cli.agent.validate().map_err(|e| e.to_string())
    }

    fn settings(extra: &[&str]) -> Settings {
        parse(extra).unwrap().settings
    }

    #[test]
    fn defaults_match_kube2iam_where_safe() {
        let s = settings(&[]);
        assert_eq!(s.imds.app_port, 8181);
        assert_eq!(s.admin.metrics_port, Some(8182));
        assert_eq!(s.policy.iam_role_key, "iam.amazonaws.com/role");
        assert_eq!(s.policy.iam_external_id, "iam.amazonaws.com/external-id");
        assert_eq!(s.policy.namespace_key, "iam.amazonaws.com/allowed-roles");
        assert_eq!(s.sts.iam_role_session_ttl.refresh_before(), Duration::from_secs(1800));
        assert_eq!(s.imds.backoff_max_elapsed_time, Duration::from_secs(2));
        assert!(s.imds.credential_audit_log);
        assert!(!settings(&["--credential-audit-log=false"]).imds.credential_audit_log);
        assert_eq!(s.imds.metadata_addr.as_str(), "169.254.169.254");
        assert!(s.policy.namespace_restrictions.is_none());
        assert_eq!(s.network.iptables_keep_on_exit, KeepOnExit::Auto);
        assert_eq!(s.network.startup_taint.as_deref(), Some("iamlet.io/agent-not-ready"));
        assert_eq!(s.network.host_interface, InterfaceSetting::Auto);
        assert_eq!(s.network.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
    }

    #[test]
    fn the_session_scope_is_the_pods_unless_asked_otherwise() {
        use crate::resolve::SessionScope;
        assert_eq!(settings(&[]).sts.sessions.scope, SessionScope::Pod);
        assert_eq!(settings(&["--session-scope=service-account"]).sts.sessions.scope, SessionScope::ServiceAccount);
        assert_eq!(settings(&["--session-scope", "role"]).sts.sessions.scope, SessionScope::Role);
        let sessions = settings(&["--session-scope=service-account", "--source-identity"]).sts.sessions;
        assert!(sessions.source_identity, "a ServiceAccount's session can name its ServiceAccount");
        let error = parse(&["--session-scope=role", "--source-identity"]).unwrap_err();
        assert!(error.contains("--session-scope=role") && error.contains("service-account"), "{error}");
    }

    #[test]
    fn the_sts_budget_has_a_default_and_refuses_what_is_no_rate() {
        let budget = settings(&[]).sts.sts_budget;
        assert_eq!((budget.rate, budget.burst), (10.0, 20.0));
        let budget = settings(&["--sts-max-rps=0.5", "--sts-burst=1"]).sts.sts_budget;
        assert_eq!((budget.rate, budget.burst), (0.5, 1.0));
        for (flag, bad) in
            [("--sts-max-rps", "0"), ("--sts-max-rps", "-3"), ("--sts-max-rps", "fast"), ("--sts-burst", "0")]
        {
            let error = parse(&[&format!("{flag}={bad}")]).unwrap_err();
            assert!(error.contains(flag), "{flag}={bad}: {error}");
        }
        assert!(parse(&["--sts-max-rps=NaN"]).unwrap_err().contains("not a rate"));
    }

    #[test]
    fn kube2iam_flags_without_effect_are_accepted_and_named() {
        assert!(settings(&[]).ignored_flags.is_empty());
        let given =
            settings(&["--cache-resync-period=30m", "--resolve-duplicate-cache-ips=true", "--backoff-max-interval=1s"]);
        let flags: Vec<&str> = given.ignored_flags.iter().map(|ignored| ignored.flag).collect();
        assert_eq!(flags, ["--cache-resync-period", "--resolve-duplicate-cache-ips", "--backoff-max-interval"]);
        assert!(parse(&["--cache-resync-period=soon"]).unwrap_err().contains("--cache-resync-period"));
    }

    #[test]
    fn every_kube2iam_flag_is_accepted_with_its_meaning() {
        // jtblin/kube2iam's whole flag set, as its DaemonSets pass it (but --version).
        let s = settings(&[
            "--kubeconfig=/etc/kubeconfig",
            "--api-server=https://10.0.0.1:6443",
            "--api-token=t0ken",
            "--app-port=8181",
            "--metrics-port=8181",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--debug",
            "--default-role=fallback",
            "--iam-role-key=example.com/role",
            "--iam-external-id=example.com/external-id",
            "--iam-role-session-ttl=20m",
            "--insecure=true",
            "--metadata-addr=169.254.169.254",
            "--iptables=true",
            "--host-interface=cali+",
            "--namespace-restrictions",
            "--namespace-restriction-format=regexp",
            "--namespace-key=example.com/allowed",
            "--cache-resync-period=30m",
            "--resolve-duplicate-cache-ips",
            "--host-ip=10.0.0.5",
            "--backoff-max-interval=1s",
            "--backoff-max-elapsed-time=3s",
            "--log-format=json",
            "--log-level=warning",
            "--use-regional-sts-endpoint",
            "--verbose",
        ]);
        assert_eq!(s.kube.kubeconfig, Some(PathBuf::from("/etc/kubeconfig")));
        assert_eq!(s.kube.api_server.as_deref(), Some("https://10.0.0.1:6443"));
        assert!(s.kube.insecure);
        assert_eq!((s.imds.app_port, s.admin.metrics_port), (8181, None));
        assert!(s.admin.debug);
        assert_eq!(s.policy.iam_role_key, "example.com/role");
        assert_eq!(s.policy.iam_external_id, "example.com/external-id");
        assert_eq!(s.sts.iam_role_session_ttl.refresh_before(), Duration::from_secs(1200));
        assert!(s.network.iptables);
        assert_eq!(s.network.host_interface, InterfaceSetting::Given(InterfaceMatch::parse("cali+").unwrap()));
        assert_eq!(s.policy.namespace_restrictions, Some(RestrictionFormat::Regexp));
        assert_eq!(s.policy.namespace_key, "example.com/allowed");
        assert_eq!(s.imds.backoff_max_elapsed_time, Duration::from_secs(3));
        assert_eq!(s.logging.log_format, LogFormat::Json);
        assert_eq!(s.logging.log_level, tracing::Level::DEBUG, "--verbose wins");
        assert!(s.sts.use_regional_sts_endpoint);
        assert_eq!(s.ignored_flags.len(), 3);
        let discovered = settings(&["--auto-discover-base-arn", "--auto-discover-default-role"]);
        assert!(matches!(discovered.policy.base_role_arn, crate::policy::BaseArnSource::Discover));
        assert!(matches!(discovered.policy.default_role, crate::policy::DefaultRoleSource::Discover));
    }

    #[test]
    fn one_port_for_both_as_kube2iams_chart_gives_serves_no_admin_endpoints() {
        assert_eq!(settings(&["--metrics-port=8181"]).admin.metrics_port, None);
        assert_eq!(settings(&["--app-port=9000", "--metrics-port=9000"]).admin.metrics_port, None);
        assert_eq!(settings(&["--app-port=9000"]).admin.metrics_port, Some(8182));
    }

    #[test]
    fn keep_on_exit_takes_auto_and_go_booleans() {
        assert_eq!(settings(&["--iptables-keep-on-exit"]).network.iptables_keep_on_exit, KeepOnExit::Always);
        assert_eq!(settings(&["--iptables-keep-on-exit=false"]).network.iptables_keep_on_exit, KeepOnExit::Never);
        assert_eq!(settings(&["--iptables-keep-on-exit=auto"]).network.iptables_keep_on_exit, KeepOnExit::Auto);
        assert!(settings(&["--startup-taint="]).network.startup_taint.is_none(), "empty disables");
        let aws = settings(&["--host-interface=eni+,vlan+"]).network.host_interface;
        assert_eq!(aws, InterfaceSetting::Given(InterfaceMatch::parse("eni+,vlan+").unwrap()));
    }

    #[test]
    fn pod_port_binding_is_on_by_default_and_reads_libcnis_cache() {
        use crate::netfilter::binding::BindPodPorts;
        let binding = settings(&[]).network.binding;
        assert_eq!(binding.bind_pod_ports, BindPodPorts::Auto);
        assert_eq!(binding.cni_results_dir, PathBuf::from("/var/lib/cni/results"));
        assert_eq!(settings(&["--bind-pod-ports=false"]).network.binding.bind_pod_ports, BindPodPorts::Never);
        assert_eq!(settings(&["--bind-pod-ports"]).network.binding.bind_pod_ports, BindPodPorts::Always);
    }

    #[test]
    fn go_style_booleans_are_accepted_on_every_boolean_flag() {
        let s = settings(&["--iptables=true", "--host-ip=10.0.0.5", "--namespace-restrictions"]);
        assert!(s.network.iptables);
        assert_eq!(s.policy.namespace_restrictions, Some(RestrictionFormat::Glob));
        assert!(!settings(&["--require-imdsv2=false"]).imds.require_imdsv2);
        assert!(settings(&["--require-imdsv2=1"]).imds.require_imdsv2);
        assert!(settings(&["--debug=T"]).admin.debug);
        assert!(!settings(&["--pod-events=False"]).imds.pod_events);
        assert!(parse(&["--debug=yes"]).unwrap_err().contains("--debug"));
        let explain = Cli::try_parse_args(["iamlet", "explain", "a/b", "--check-sts=true", "--insecure=1"]).unwrap();
        let Some(Command::Explain(args)) = explain.command else { panic!("not explain") };
        assert!(args.check_sts && args.components.kube.insecure);
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
            (&["--metrics-port=0"], "--metrics-port"),
            (&["--api-server=not a url"], "--api-server"),
            (&["--iptables"], "--host-ip"),
            (&["--iam-role-key="], "--iam-role-key"),
            (&["--host-interface=eth 0"], "--host-interface"),
            (&["--host-ip=fd00::1", "--host-ipv6=fd00::2"], "--host-ipv6"),
            (&["--iptables-sync-period=10ms"], "--iptables-sync-period"),
            (&["--host-interface=!eth0,eni+"], "--host-interface"),
            (&["--startup-taint=not a key"], "--startup-taint"),
            (&["--iptables-keep-on-exit=maybe"], "--iptables-keep-on-exit"),
            (&["--bind-pod-ports=sometimes"], "--bind-pod-ports"),
            (&["--app-port=0"], "--app-port"),
            (&["--max-connections=10", "--max-connections-per-ip=20"], "--max-connections-per-ip"),
            (&["--cluster-name=prod"], "--cluster-name"),
            (&["--session-tags", "--cluster-name=prod,eu"], "--cluster-name"),
            (&["--session-tags", "--cluster-name= "], "--cluster-name"),
            (&["--assume-role-arn=iamlet-intermediate"], "--assume-role-arn"),
            (&["--session-scope=role", "--source-identity"], "--source-identity"),
            (&["--assume-role-arn=arn:aws:iam::123456789012:user/iamlet"], "--assume-role-arn"),
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
            (vec!["--session-scope=namespace"], "--session-scope"),
        ] {
            let error = parse(&args).unwrap_err();
            assert!(error.contains(flag), "{error}");
        }
    }

    #[test]
    fn node_is_required() {
        let mut cli = Cli::try_parse_args(["iamlet"]).unwrap();
        cli.agent.node.node = None; // whatever NODE_NAME the test runner has
        assert!(cli.agent.validate().unwrap_err().to_string().contains("--node"));
    }

    #[test]
    fn bare_default_role_needs_a_base() {
        let s = settings(&["--default-role=app", "--base-role-arn=arn:aws:iam::123456789012:role"]);
        assert_eq!(s.policy.default_role, DefaultRoleSource::Given("app".into()));
        let s = settings(&["--auto-discover-default-role"]);
        assert_eq!(s.policy.default_role, DefaultRoleSource::Discover);
        assert_eq!(s.policy.base_role_arn, BaseArnSource::Discover);
    }

    #[test]
    fn verbose_means_debug() {
        assert_eq!(settings(&["--verbose"]).logging.log_level, tracing::Level::DEBUG);
        assert_eq!(settings(&["--log-level=fatal"]).logging.log_level, tracing::Level::ERROR);
    }

    #[test]
    fn help_groups_flags_under_their_component() {
        let help = go_booleans(Cli::command()).render_help().to_string();
        for heading in ["Kubernetes:", "Node:", "Node networking:", "Roles and policy:", "STS:", "Metadata API:"] {
            assert!(help.contains(heading), "{heading} missing from:\n{help}");
        }
        let sts = help.find("STS:").unwrap();
        assert!(help[sts..].find("--sts-timeout") < help[sts..].find("Metadata API:"), "{help}");
    }
}
