//! The agent as its image's container (`IAMLET_IMAGE`, built by `scripts/image.sh build`),
//! run with podman in a node's network namespace, with the DaemonSet's security context and
//! mounts as the rendered base manifest has them (`scripts/image.sh run-flags`): read from
//! `manifests/base`, not restated here, so a change to the manifest is what the end-to-end
//! tests run with. `tests/it/e2e_image.rs` checks the result in the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The image the end-to-end tests run the agent as, when set.
pub fn image() -> Option<String> {
    std::env::var("IAMLET_IMAGE").ok().filter(|image| !image.is_empty())
}

/// `podman` with the flags this machine needs (one place: `scripts/image.sh podman`).
pub fn podman() -> Command {
    let mut command = Command::new(crate::repo_root().join("scripts/image.sh"));
    command.arg("podman");
    command
}

/// The `podman run` flags of the DaemonSet's container (security context, host mounts),
/// from the rendered base manifest (`scripts/image.sh run-flags`), with the host side of
/// each mount made ready as kubelet makes it for the volume's type. `host_paths` gives a
/// mount (by its path in the container) another host path.
pub fn daemonset_flags(host_paths: &[(&str, &Path)]) -> Vec<String> {
    let mut command = Command::new(crate::repo_root().join("scripts/image.sh"));
    command.arg("run-flags");
    for (inside, host) in host_paths {
        command.arg(format!("--host-path={inside}={}", host.display()));
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "scripts/image.sh run-flags: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

/// The directory the agent reads the CNI configuration from, by default (and where the
/// DaemonSet mounts the node's).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where the DaemonSet mounts libcni's result cache (`--cni-results-dir`'s default).
pub const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";

/// Where the DaemonSet mounts the agent's state directory (`--state-dir`'s default).
pub const STATE_DIR: &str = "/run/iamlet";

/// A directory the DaemonSet mounts from the node: the flag and the environment variable
/// that name it, and where the DaemonSet mounts it.
struct Mounted {
    flag: &'static str,
    env: &'static str,
    inside: &'static str,
}

const MOUNTED: [Mounted; 3] = [
    Mounted { flag: "--cni-conf-dir=", env: "IAMLET_CNI_CONF_DIR", inside: CNI_CONF_DIR },
    Mounted { flag: "--cni-results-dir=", env: "IAMLET_CNI_RESULTS_DIR", inside: CNI_RESULTS_DIR },
    Mounted { flag: "--state-dir=", env: "IAMLET_STATE_DIR", inside: STATE_DIR },
];

/// `podman run` of `image` as the DaemonSet runs it, on `network` (`host`, or
/// `ns:/run/netns/<node>`), named `name`, with `env` and `args`. A directory the DaemonSet
/// mounts (`--cni-conf-dir`, `--cni-results-dir`, `--state-dir`), named by its flag among the
/// args or its variable in `env`, is what that mount shows the agent: the directory is
/// mounted there, and the flag or variable points at the mount.
pub fn run_command(image: &str, name: &str, network: &str, env: &[(String, String)], args: &[String]) -> Command {
    let given: Vec<(&str, PathBuf)> = MOUNTED
        .iter()
        .filter_map(|mounted| {
            let by_flag = args.iter().find_map(|a| a.strip_prefix(mounted.flag));
            let by_env = env.iter().find(|(key, _)| key == mounted.env).map(|(_, value)| value.as_str());
            by_flag.or(by_env).map(|dir| (mounted.inside, PathBuf::from(dir)))
        })
        .collect();
    let host_paths: Vec<(&str, &Path)> = given.iter().map(|(inside, dir)| (*inside, dir.as_path())).collect();
    let mut command = podman();
    command.args(["run", "--rm", "--pull=never", "--name", name]);
    command.arg(format!("--network={network}"));
    command.args(["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"]);
    command.args(daemonset_flags(&host_paths));
    for (key, value) in env {
        let value = MOUNTED.iter().find(|mounted| mounted.env == key).map_or(value.as_str(), |mounted| mounted.inside);
        command.arg(format!("--env={key}={value}"));
    }
    command.arg(image);
    command.args(args.iter().map(|a| match MOUNTED.iter().find(|mounted| a.starts_with(mounted.flag)) {
        Some(mounted) => format!("{}{}", mounted.flag, mounted.inside),
        None => a.clone(),
    }));
    command
}

/// The host PID of the container's agent.
pub fn pid(name: &str) -> Option<u32> {
    let output = podman().args(["inspect", "--format", "{{.State.Pid}}", name]).output().ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok().filter(|pid| *pid > 0)
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`...) to the container's agent.
pub fn kill(name: &str, signal: &str) {
    let status = podman().args(["kill", "--signal", signal, name]).output().unwrap();
    assert!(status.status.success(), "podman kill {name}: {}", String::from_utf8_lossy(&status.stderr));
}

/// `podman stop`: SIGTERM, and SIGKILL after `timeout_secs`.
pub fn stop(name: &str, timeout_secs: u32) {
    let output = podman().args(["stop", "--time", &timeout_secs.to_string(), name]).output().unwrap();
    assert!(output.status.success(), "podman stop {name}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Removes the container whatever its state (a test's clean-up).
pub fn remove(name: &str) {
    let _ = podman().args(["rm", "--force", "--time", "0", name]).output();
}
