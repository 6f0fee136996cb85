//! The real `iamlet` binary, run inside a node namespace.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::netns::{HOST_IP, Netns};
use super::pod_client;

pub const BIN: &str = env!("CARGO_BIN_EXE_iamlet");

/// A running agent process; killed (SIGKILL) on drop if still running.
pub struct AgentProcess {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
    pub admin: SocketAddr,
}

/// Starts `iamlet <args>` in `node`, with test AWS credentials, STS at `sts_url`, and `env`.
pub fn spawn(node: &Netns, sts_url: &str, args: &[String], env: &[(&str, String)]) -> AgentProcess {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &node.name, BIN])
        .args(args)
        .env_clear()
        .envs(super::agent_env(sts_url))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let admin_port =
        args.iter().find_map(|a| a.strip_prefix("--metrics-port=")).map(|p| p.parse().unwrap()).unwrap_or(8182);
    AgentProcess { child, log, _dir: dir, admin: format!("{HOST_IP}:{admin_port}").parse().unwrap() }
}

impl AgentProcess {
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for exit, failing the test after `seconds`.
    pub fn wait(&mut self, seconds: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 (checked from inside the node namespace).
    pub async fn wait_ready(&mut self, node: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let admin = self.admin;
            let ready = node
                .run(move || async move {
                    pod_client::fetch(admin, "/readyz", &[], Duration::from_secs(1))
                        .await
                        .is_some_and(|r| r.status == 200)
                })
                .await;
            if ready {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before it was ready; its log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the agent was not ready in 30s; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
