//! The agent's flags for a test, built in one place for every way a test runs the agent:
//! in-process ([`crate::node`]), as a process on loopback (the CLI tests and the benchmark)
//! and as a process in a node namespace ([`crate::e2e`]).

use std::net::SocketAddr;

/// An agent's command line: node `node-a`, the fake API server, and the test account's base
/// ARN unless the test sets its own role source.
#[derive(Debug, Clone)]
pub struct AgentFlags {
    flags: Vec<String>,
}

impl AgentFlags {
    /// The flags every test agent has: its node and API server, listening on `host_ip`.
    pub fn new(api_url: &str, host_ip: &str) -> Self {
        Self { flags: vec!["--node=node-a".into(), format!("--api-server={api_url}"), format!("--host-ip={host_ip}")] }
    }

    /// An agent on loopback whose node metadata service is the fake at `imds_addr`.
    pub fn loopback(api_url: &str, imds_addr: &str) -> Self {
        Self::new(api_url, "127.0.0.1").flag(format!("--metadata-addr={imds_addr}"))
    }

    /// No startup taint to remove, for an agent whose API server holds no Node: a process
    /// then starts as it would on a node that was never tainted.
    pub fn without_startup_taint(self) -> Self {
        self.flag("--startup-taint=")
    }

    /// Sets one flag (`--name=value`, or a bare switch), replacing any earlier value: the
    /// agent refuses a flag given twice.
    pub fn flag(mut self, flag: impl Into<String>) -> Self {
        let flag = flag.into();
        let name = flag.split('=').next().unwrap_or_default().to_string();
        self.flags.retain(|f| f.split('=').next() != Some(name.as_str()));
        self.flags.push(flag);
        self
    }

    /// Sets a test's own flags over the defaults.
    pub fn with<S: AsRef<str>>(self, flags: &[S]) -> Self {
        flags.iter().fold(self, |flags, flag| flags.flag(flag.as_ref()))
    }

    /// The metadata API's and the admin server's ports.
    pub fn ports(self, app: u16, admin: u16) -> Self {
        self.flag(format!("--app-port={app}")).flag(format!("--metrics-port={admin}"))
    }

    /// The value of `--name=value`, the last one given.
    pub fn value(&self, name: &str) -> Option<&str> {
        let prefix = format!("--{name}=");
        self.flags.iter().rev().find_map(|f| f.strip_prefix(&prefix))
    }

    /// Where the agent listens: `--host-ip` with the app and admin ports (8181 and 8182
    /// unless set).
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        let ip = self.value("host-ip").expect("every test agent has --host-ip");
        let port = |name, default: u16| self.value(name).map_or(default, |p| p.parse().expect("a port"));
        let at = |port: u16| format!("{ip}:{port}").parse().expect("an address");
        (at(port("app-port", 8181)), at(port("metrics-port", 8182)))
    }

    /// The arguments, without the program's name. The test account's base ARN comes first
    /// unless the test chose its own (`--base-role-arn=` for none, or auto-discovery).
    pub fn args(&self) -> Vec<String> {
        let own_base = self.flags.iter().any(|f| f.starts_with("--base-role-arn") || f.starts_with("--auto-discover"));
        let base = (!own_base).then(|| format!("--base-role-arn={}", crate::role_arn("")));
        base.into_iter().chain(self.flags.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::AgentFlags;

    #[test]
    fn the_test_accounts_base_arn_unless_the_test_chose() {
        let default = AgentFlags::new("http://api", "127.0.0.1").args();
        assert!(default.contains(&"--base-role-arn=arn:aws:iam::123456789012:role/".to_string()), "{default:?}");
        for own in ["--base-role-arn=", "--auto-discover-base-arn"] {
            let args = AgentFlags::new("http://api", "127.0.0.1").with(&[own]).args();
            assert_eq!(
                args.iter().filter(|a| a.starts_with("--base-role-arn")).count(),
                usize::from(own.contains('='))
            );
        }
    }

    #[test]
    fn a_tests_flag_replaces_the_default() {
        let args = AgentFlags::loopback("http://api", "127.0.0.1:1")
            .without_startup_taint()
            .with(&["--startup-taint=a/b"])
            .args();
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--startup-taint")).collect::<Vec<_>>(),
            ["--startup-taint=a/b"]
        );
    }

    #[test]
    fn addresses_follow_the_flags() {
        let flags = AgentFlags::new("http://api", "10.0.0.1");
        assert_eq!(flags.addresses(), ("10.0.0.1:8181".parse().unwrap(), "10.0.0.1:8182".parse().unwrap()));
        let flags = flags.ports(1, 2);
        assert_eq!(flags.addresses(), ("10.0.0.1:1".parse().unwrap(), "10.0.0.1:2".parse().unwrap()));
    }
}
