//! The `iamlet` binary itself: flag errors, the SDK's standard configuration (env
//! credentials, `AWS_ENDPOINT_URL_STS`), JSON logs, port conflicts, and a clean exit on
//! SIGTERM that lets in-flight requests finish.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::apiserver::{FakeApiServer, pod};
use support::eventually;
use support::imds::FakeImds;
use support::pod_client;
use support::sts_proxy::StsProxy;

const BIN: &str = env!("CARGO_BIN_EXE_iamlet");

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).env_remove("NODE_NAME").env_remove("HOST_IP").output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--node=n", "--base-role-arn=arn:aws:s3:::bucket"], "--base-role-arn"),
        (&["--node=n", "--iam-role-session-ttl=0s"], "--iam-role-session-ttl"),
        (
            &["--node=n", "--auto-discover-base-arn", "--base-role-arn=arn:aws:iam::123456789012:role/"],
            "--auto-discover-base-arn",
        ),
        (&["--node=n", "--log-format=xml"], "--log-format"),
        (&["--node=n", "--app-port=http"], "--app-port"),
        (&["--node=n", "--no-such-flag"], "--no-such-flag"),
        (&[], "--node"),
    ];
    for (args, flag) in cases {
        let (code, _, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr:?} should name {flag}");
    }
    let (code, _, stderr) = run(&["--node=n", "--iam-role-session-ttl=0s"]);
    assert_eq!((code, stderr.lines().count()), (2, 1), "one line: {stderr:?}");
}

#[test]
fn version_is_printed() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("iamlet {}", env!("CARGO_PKG_VERSION")));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn agent_command(
    api: &FakeApiServer,
    sts: &StsProxy,
    imds: &FakeImds,
    app_port: u16,
    admin_port: u16,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(support::loopback_agent_args(&api.url, &imds.addr, app_port, admin_port))
        .arg("--log-format=json")
        .env_clear()
        .envs(support::agent_env(&sts.url))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn the_binary_serves_then_drains_and_exits_0_on_sigterm() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let (app_port, admin_port) = (free_port(), free_port());
    let mut child = agent_command(&api, &sts, &imds, app_port, admin_port).spawn().unwrap();
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], app_port));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    eventually(20, "the binary to be ready", async || {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && pod_client::get("127.0.0.1", admin, "/readyz").await.status == 200
    })
    .await;

    api.create_pod(pod("shop", "web").ip("127.0.0.50").role("app").build());
    let reply = pod_client::get("127.0.0.50", app, "/latest/meta-data/iam/security-credentials/app").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(sts.assume_role_calls().len(), 1, "STS reached through AWS_ENDPOINT_URL_STS");
    assert_eq!(sts.assume_role_calls()[0]["RoleSessionName"], "shop.web");

    // A request in flight when SIGTERM arrives still gets its answer.
    sts.set_delay(Duration::from_millis(1500));
    api.create_pod(pod("shop", "late").ip("127.0.0.51").role("late").build());
    let in_flight = tokio::spawn(pod_client::get("127.0.0.51", app, "/latest/meta-data/iam/security-credentials/late"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = child.id().unwrap() as i32;
    assert_eq!(send_signal(pid, "TERM"), 0);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let status =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("exits after the drain").unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(tokio::net::TcpStream::connect(app).await.is_err(), "the port is released");

    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).await.unwrap();
    let lines: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    assert!(
        lines.iter().any(|l| l["message"] == "shutting down: draining in-flight requests" && l["signal"] == "SIGTERM"),
        "{stderr}"
    );
}

/// Sends a signal with the `kill` command (no libc binding needed for one call).
fn send_signal(pid: i32, signal: &str) -> i32 {
    Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().code().unwrap_or(-1)
}

#[tokio::test]
async fn an_app_port_in_use_is_a_clear_error() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = agent_command(&api, &sts, &imds, port, free_port()).output().await.unwrap();
    assert_ne!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--app-port") && stderr.contains("another process"), "{stderr}");
}
