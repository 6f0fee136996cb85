//! The `iamlet` binary itself: flag errors, the SDK's standard configuration (env
//! credentials, `AWS_ENDPOINT_URL_STS`), JSON logs, port conflicts, and a clean exit on
//! SIGTERM that lets in-flight requests finish.

use std::process::Command;
use std::time::Duration;

use iamlet_testkit::agent::{AgentCommand, AgentProcess, binary};
use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::imds::FakeImds;
use iamlet_testkit::pod_client::{self, Reply};
use iamlet_testkit::sts_proxy::StsProxy;
use iamlet_testkit::{AgentFlags, eventually, free_port};
use nix::sys::signal::Signal;

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary()).args(args).env_remove("NODE_NAME").env_remove("HOST_IP").output().unwrap();
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

/// The binary on loopback against the fakes, with JSON logs, not yet started.
fn agent(api: &FakeApiServer, sts: &StsProxy, imds: &FakeImds, app_port: u16) -> AgentCommand {
    AgentCommand::new(flags(api, imds, app_port), &sts.url)
}

/// Its flags.
fn flags(api: &FakeApiServer, imds: &FakeImds, app_port: u16) -> AgentFlags {
    AgentFlags::loopback(&api.url, &imds.addr)
        .without_startup_taint()
        .ports(app_port, free_port())
        .flag("--log-format=json")
}

/// Whether the agent logged `message` (in JSON) with this `signal` field.
fn logged(agent: &AgentProcess, message: &str, signal: &str) -> bool {
    let log = agent.log();
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|_| panic!("not JSON: {l}\n{log}")))
        .any(|l| l["message"] == message && l["signal"] == signal)
}

/// A new pod at `ip` whose role is `role` asks for its credentials; returns once the request
/// is in flight in the agent, with its answer to come.
async fn request_in_flight(
    api: &FakeApiServer,
    agent: &AgentProcess,
    ip: &'static str,
    role: &str,
) -> tokio::task::JoinHandle<Reply> {
    api.create_pod(pod("shop", role).ip(ip).role(role).build());
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let app = agent.app;
    let request = tokio::spawn(async move { pod_client::get(ip, app, &path).await });
    eventually(10, "the request to reach the agent", async || {
        agent.metric("iamlet_http_requests_in_flight").await == Some(1.0)
    })
    .await;
    request
}

#[tokio::test]
async fn the_binary_serves_then_drains_and_exits_0_on_sigterm() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let mut agent = agent(&api, &sts, &imds, free_port()).spawn();
    agent.wait_ready().await;

    api.create_pod(pod("shop", "web").ip("127.0.0.50").role("app").build());
    let reply = pod_client::get("127.0.0.50", agent.app, "/latest/meta-data/iam/security-credentials/app").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(sts.assume_role_calls().len(), 1, "STS reached through AWS_ENDPOINT_URL_STS");
    assert_eq!(sts.assume_role_calls()[0]["RoleSessionName"], "shop.web");

    // A request in flight when SIGTERM arrives still gets its answer.
    sts.set_delay(Duration::from_millis(1500));
    let in_flight = request_in_flight(&api, &agent, "127.0.0.51", "late").await;
    agent.signal(Signal::SIGTERM);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let app = agent.app;
    assert_eq!(agent.exit(Duration::from_secs(15)).await.code(), Some(0), "{}", agent.log());
    assert!(tokio::net::TcpStream::connect(app).await.is_err(), "the port is released");
    assert!(logged(&agent, "shutting down: draining in-flight requests", "SIGTERM"), "{}", agent.log());
}

#[tokio::test]
async fn a_second_signal_during_the_drain_exits_130_at_once() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let mut agent = agent(&api, &sts, &imds, free_port()).spawn();
    agent.wait_ready().await;
    // A request that would keep the drain waiting for a minute.
    sts.set_delay(Duration::from_secs(60));
    let _in_flight = request_in_flight(&api, &agent, "127.0.0.52", "slow").await;

    agent.signal(Signal::SIGTERM);
    eventually(10, "the drain to start", async || agent.log().contains("shutting down: draining")).await;
    agent.signal(Signal::SIGINT);
    let status = agent.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "{}", agent.log());
    assert!(logged(&agent, "second signal: exiting without draining", "SIGINT"), "{}", agent.log());
}

#[tokio::test]
async fn kube2iam_flags_without_effect_start_the_agent_and_say_why_once() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let ignored = ["--cache-resync-period", "--resolve-duplicate-cache-ips", "--backoff-max-interval"];
    let kube2iam = ["--cache-resync-period=30m", "--resolve-duplicate-cache-ips", "--backoff-max-interval=1s"];
    let mut agent = AgentCommand::new(flags(&api, &imds, free_port()).with(&kube2iam), &sts.url).spawn();
    agent.wait_ready().await;
    let log = agent.log();
    for flag in ignored {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(flag)).collect();
        assert_eq!(lines.len(), 1, "{flag}: {log}");
        assert!(lines[0].contains("kube2iam flag accepted without effect"), "{}", lines[0]);
    }
}

#[tokio::test]
async fn kube2iams_chart_arguments_one_port_and_a_healthz_probe() {
    // kube2iam's chart gives --metrics-port the app port and probes /healthz there.
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let port = free_port();
    let one_port = flags(&api, &imds, port).ports(port, port);
    let mut agent = AgentCommand::new(one_port, &sts.url).spawn();
    eventually(60, "the /healthz probe on the app port", async || {
        pod_client::try_get("127.0.0.1".parse().unwrap(), agent.app, "/healthz").await.is_ok_and(|r| r.status == 200)
    })
    .await;
    api.create_pod(pod("shop", "web").ip("127.0.0.53").role("app").build());
    let reply = pod_client::get("127.0.0.53", agent.app, "/latest/meta-data/iam/security-credentials/app").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    for admin_only in ["/metrics", "/readyz", "/debug/store"] {
        assert_eq!(pod_client::get("127.0.0.53", agent.app, admin_only).await.status, 404, "{admin_only}");
    }
    let warnings: Vec<String> =
        agent.log().lines().filter(|l| l.contains("--metrics-port equals --app-port")).map(String::from).collect();
    assert_eq!(warnings.len(), 1, "{}", agent.log());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(15)).await.code(), Some(0), "{}", agent.log());
}

#[tokio::test]
async fn an_app_port_in_use_is_a_clear_error() {
    let (api, sts, imds) = (FakeApiServer::start().await, StsProxy::start().await, FakeImds::start().await);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut agent = agent(&api, &sts, &imds, port).spawn();
    assert_ne!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));
    let log = agent.log();
    assert!(log.contains("--app-port") && log.contains("another process"), "{log}");
}

/// The agent's arguments in each Helm render (`scripts/check-chart.py --args`): defaults,
/// each CNI, the canary, and a kube2iam-style values file.
fn helm_rendered_args() -> serde_json::Map<String, serde_json::Value> {
    let root = iamlet_testkit::repo_root();
    let out = tempfile::tempdir().unwrap();
    let rendered = Command::new(root.join(".venv-deploy/bin/python"))
        .arg(root.join("scripts/check-chart.py"))
        .arg("--args")
        .arg(out.path())
        .current_dir(&root)
        .output()
        .expect("the deploy checkers' Python (scripts/install-test-deps.sh makes .venv-deploy)");
    assert!(rendered.status.success(), "rendering the chart: {}", String::from_utf8_lossy(&rendered.stderr));
    let text = std::fs::read_to_string(out.path().join("helm-args.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_helm_render_gives_the_agent_arguments_it_accepts() {
    let renders = helm_rendered_args();
    assert!(renders.len() >= 9, "{:?}", renders.keys());
    for (name, args) in renders {
        // What the kubelet substitutes from the downward API.
        let args: Vec<String> = std::iter::once("iamlet".to_string())
            .chain(
                args.as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().replace("$(NODE_NAME)", "node-a").replace("$(HOST_IP)", "10.0.1.23")),
            )
            .collect();
        let cli = iamlet::cli::Cli::try_parse_args(&args).unwrap_or_else(|e| panic!("{name}: {args:?}: {e}"));
        cli.agent.validate().unwrap_or_else(|e| panic!("{name}: {args:?}: {}", iamlet::describe(&e)));
    }
}
