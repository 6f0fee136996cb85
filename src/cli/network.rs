//! Node networking flags: iamlet's rules, where they send traffic, and the startup taint.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::FlagError;
use super::values::{parse_duration, parse_taint_key};
use crate::cluster::taint::DEFAULT_STARTUP_TAINT;
use crate::netfilter::binding::{BindPodPorts, BindingSettings};
use crate::netfilter::lifecycle::KeepOnExit;
use crate::netfilter::{BackendChoice, InterfaceMatch, InterfaceSetting, NetworkSettings};

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Node networking")]
pub struct NetworkArgs {
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

    /// Install the DNAT rule that sends pod metadata traffic to iamlet.
    #[arg(long)]
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

    /// Bind each pod's addresses to its own port on the node (in the kernel), so a pod that
    /// forges another's address gets nothing: `auto` binds wherever the CNI's records can be
    /// read (off, with a warning, elsewhere); `true` binds and refuses pods without a record;
    /// `false` knows pods by address alone, as kube2iam does.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_value = "auto",
        default_missing_value = "true",
        value_parser = BindPodPorts::parse,
        env = "IAMLET_BIND_POD_PORTS"
    )]
    pub bind_pod_ports: BindPodPorts,

    /// libcni's result cache (written by containerd and CRI-O for every pod), mounted
    /// read-only: where `--bind-pod-ports` learns each pod's port, MAC and addresses.
    #[arg(long, default_value = "/var/lib/cni/results", env = "IAMLET_CNI_RESULTS_DIR")]
    pub cni_results_dir: PathBuf,

    /// Taint removed from this node once iamlet's rules are in place and it is ready, so
    /// nodes registered with it run no pod before they are protected; empty disables.
    #[arg(long, default_value = DEFAULT_STARTUP_TAINT)]
    pub startup_taint: String,
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

impl NetworkArgs {
    pub fn settings(self) -> Result<NetworkSettings, FlagError> {
        let flag = |flag: &'static str, message: String| FlagError { flag, message };
        if self.iptables && self.host_ip.is_none() {
            return Err(flag(
                "--host-ip",
                "is required with --iptables: it is where pod traffic is sent (HOST_IP from status.hostIP)".into(),
            ));
        }
        if self.host_ipv6.is_some() && self.host_ip.is_some_and(|ip| ip.is_ipv6()) {
            return Err(flag(
                "--host-ipv6",
                "--host-ip is already IPv6; give --host-ip the node's IPv4 address".into(),
            ));
        }
        if self.iptables_sync_period < Duration::from_secs(1) {
            return Err(flag("--iptables-sync-period", "must be at least 1s".into()));
        }
        let host_interface = match self.host_interface.trim() {
            "auto" => InterfaceSetting::Auto,
            text => InterfaceSetting::Given(
                InterfaceMatch::parse(text).map_err(|e| flag("--host-interface", e.to_string()))?,
            ),
        };
        let startup_taint = match self.startup_taint.trim() {
            "" => None,
            key => Some(parse_taint_key(key).map_err(|message| flag("--startup-taint", message))?),
        };
        Ok(NetworkSettings {
            host_ip: self.host_ip,
            host_ipv6: self.host_ipv6,
            host_interface,
            cni_conf_dir: self.cni_conf_dir,
            iptables: self.iptables,
            iptables_sync_period: self.iptables_sync_period,
            iptables_keep_on_exit: self.iptables_keep_on_exit,
            iptables_backend: self.iptables_backend.into(),
            startup_taint,
            binding: BindingSettings { bind_pod_ports: self.bind_pod_ports, cni_results_dir: self.cni_results_dir },
        })
    }
}
