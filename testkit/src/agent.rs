//! The real `iamlet` binary as a process: on loopback (the CLI tests, the benchmark) or in a
//! node namespace (the end-to-end tests); there, with `IAMLET_IMAGE` set, as its image's
//! container (see [`crate::container`]). One launcher, so every test starts, watches and
//! stops the agent the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::flags::AgentFlags;
use crate::netns::{Netns, run_in};
use crate::pod_client::{self, Reply};

/// The agent binary: `IAMLET_BIN` if set (a release or an image's build, say), else the one
/// cargo built beside the running test or benchmark (`target/<profile>/iamlet`).
pub fn binary() -> &'static str {
    static BINARY: OnceLock<String> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Ok(path) = std::env::var("IAMLET_BIN") {
            return path;
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let mut dir = exe.parent().expect("a directory").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let binary = dir.join("iamlet");
        assert!(binary.exists(), "{} is missing: cargo builds it with the tests (or set IAMLET_BIN)", binary.display());
        binary.to_str().expect("a UTF-8 path").to_string()
    })
}

/// How to start one agent: its flags, its environment, and where it runs.
pub struct AgentCommand {
    flags: AgentFlags,
    env: Vec<(String, String)>,
    netns: Option<String>,
    /// Run as this image's container: [`AgentCommand::as_container`], or `IAMLET_IMAGE` in a
    /// node namespace.
    image: Option<String>,
}

impl AgentCommand {
    /// The agent with `flags`, test AWS credentials and STS at `sts_url`.
    pub fn new(flags: AgentFlags, sts_url: &str) -> Self {
        let env = crate::agent_env(sts_url).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Self { flags, env, netns: None, image: None }
    }

    /// Runs it inside `node`'s network namespace: as `IAMLET_IMAGE`'s container when set.
    pub fn in_netns(mut self, node: &Netns) -> Self {
        self.netns = Some(node.name.clone());
        self.image = self.image.or_else(crate::container::image);
        self
    }

    /// Runs it as `image`'s container (on the host's network unless in a node namespace).
    pub fn as_container(mut self, image: &str) -> Self {
        self.image = Some(image.to_string());
        self
    }

    /// Runs it as a process, whatever `IAMLET_IMAGE` says.
    pub fn as_process(mut self) -> Self {
        self.image = None;
        self
    }

    /// Sets one more environment variable (`POD_NAME`, say).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts it; its stderr (the log) goes to a file read by [`AgentProcess::log`]. In a
    /// node namespace with `IAMLET_IMAGE` set, it starts the image's container there.
    pub fn spawn(self) -> AgentProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        // A state directory of its own unless the test gives one (the node's, shared by the
        // agents that succeed one another on it): never the host's /run/iamlet.
        let mut flags = self.flags;
        if flags.value("state-dir").is_none() && !self.env.iter().any(|(key, _)| key == "IAMLET_STATE_DIR") {
            flags = flags.flag(format!("--state-dir={}", dir.path().join("state").display()));
        }
        let binary = binary();
        let mut container = None;
        let mut command = match (&self.netns, self.image) {
            (netns, Some(image)) => {
                static STARTED: AtomicUsize = AtomicUsize::new(0);
                let name = format!("iamlet-agent-{}-{}", std::process::id(), STARTED.fetch_add(1, Ordering::SeqCst));
                let network = match netns {
                    Some(netns) => format!("ns:/run/netns/{netns}"),
                    None => "host".to_string(),
                };
                let command = crate::container::run_command(&image, &name, &network, &self.env, &flags.args());
                container = Some(name);
                command
            }
            (Some(netns), None) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns, binary])
                    .args(flags.args())
                    .env_clear()
                    .envs(self.env.iter().map(|(k, v)| (k, v)));
                command
            }
            (None, _) => {
                let mut command = Command::new(binary);
                command.args(flags.args()).env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
                command
            }
        };
        let (app, admin) = flags.addresses();
        let started = Instant::now();
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        AgentProcess { child, log, _dir: dir, netns: self.netns, container, app, admin, started }
    }
}

/// A running agent process; killed (SIGKILL) on drop if still running.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    netns: Option<String>,
    /// The container's name, when the agent runs as the image's container.
    container: Option<String>,
    pub app: SocketAddr,
    pub admin: SocketAddr,
    started: Instant,
}

impl AgentProcess {
    /// The agent's PID (in a container, its host PID; 0 once it is gone).
    pub fn pid(&self) -> u32 {
        match &self.container {
            Some(name) => crate::container::pid(name).unwrap_or(0),
            None => self.child.id(),
        }
    }

    /// Sends `signal` to the agent (in a container, with `podman kill`).
    pub fn signal(&self, signal: Signal) {
        match &self.container {
            Some(name) => crate::container::kill(name, signal.as_str()),
            None => kill(Pid::from_raw(self.child.id() as i32), signal).unwrap(),
        }
    }

    /// Whether the agent runs as the image's container.
    pub fn in_container(&self) -> bool {
        self.container.is_some()
    }

    /// Waits for the exit, failing the test after `within`.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (in a container, `podman stop`), then the exit after the drain, which must
    /// succeed. Returns all the agent logged.
    pub async fn terminate(mut self) -> String {
        match &self.container {
            Some(name) => crate::container::stop(name, 30),
            None => self.signal(Signal::SIGTERM),
        }
        let status = self.exit(Duration::from_secs(30)).await;
        assert!(status.success(), "the agent exited {status} on SIGTERM; its log:\n{}", self.log());
        self.log()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the admin port, from where the agent runs; `None` if not answered.
    pub async fn admin_get(&self, path: &'static str) -> Option<Reply> {
        let admin = self.admin;
        let fetch = move || async move { pod_client::fetch(admin, path, &[], Duration::from_secs(2)).await };
        match &self.netns {
            Some(name) => run_in(name, fetch).await,
            None => fetch().await,
        }
    }

    /// A metric's value (see [`crate::metric_value`]); `None` until it is exported.
    pub async fn metric(&self, selector: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").await?.body;
        crate::metric_value(&text, selector)
    }

    /// Waits until `/readyz` answers 200; returns the time since the spawn. Fails the test
    /// if the agent exits first or is not ready in 30 s.
    pub async fn wait_ready(&mut self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.admin_get("/readyz").await.is_some_and(|r| r.status == 200) {
                return self.uptime();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before it was ready; its log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the agent was not ready in 30s; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resident memory in MiB: see [`rss_mib`].
    pub fn rss_mib(&self) -> (f64, f64) {
        rss_mib(self.pid())
    }

    /// The time since the spawn.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A process's resident memory in MiB: all of it (VmRSS), and the anonymous part (RssAnon:
/// the heap and stacks, what grows with pods; the rest is the binary's own mapped pages).
/// Zero once the process is gone.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (mib("VmRSS:"), mib("RssAnon:"))
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(name) = &self.container {
            crate::container::remove(name);
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
