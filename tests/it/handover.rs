//! Upgrades and restarts invisible to pods: a successor started beside its predecessor (a
//! DaemonSet's `maxSurge`) takes over its listening sockets and cached credentials, and
//! tokens outlive both; a crash costs only a cold start. Agents run as processes on loopback,
//! with the node's state directory shared as `/run/iamlet` is.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aws_config::imds::Client as ImdsClient;
use iamlet_testkit::agent::{AgentCommand, AgentProcess};
use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::e2e::BotocoreLoop;
use iamlet_testkit::imds::FakeImds;
use iamlet_testkit::pod_client::{self, Connection};
use iamlet_testkit::sts_proxy::StsProxy;
use iamlet_testkit::{AgentFlags, eventually, free_port};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROLE: &str = "handover-role";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/handover-role";
/// The pod the SDKs play (they connect from 127.0.0.1), and pods asking on raw connections.
const SDK_POD: &str = "127.0.0.1";
const RAW_PODS: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];

/// One node: the fakes, the state directory its agents share, and the ports they listen on.
struct Node {
    api: FakeApiServer,
    sts: StsProxy,
    imds: FakeImds,
    state: tempfile::TempDir,
    app: u16,
    admin: u16,
}

impl Node {
    async fn start() -> Self {
        let api = FakeApiServer::start().await;
        api.create_pod(pod("shop", "sdk").ip(SDK_POD).role(ROLE).build());
        for (i, ip) in RAW_PODS.iter().enumerate() {
            api.create_pod(pod("shop", &format!("raw-{i}")).ip(ip).role(ROLE).build());
        }
        let (sts, imds) = (StsProxy::start().await, FakeImds::start().await);
        Self { api, sts, imds, state: tempfile::tempdir().unwrap(), app: free_port(), admin: free_port() }
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("iamlet")
    }

    fn agent(&self) -> AgentCommand {
        let flags = AgentFlags::loopback(&self.api.url, &self.imds.addr)
            .without_startup_taint()
            .ports(self.app, self.admin)
            .flag(format!("--state-dir={}", self.state_dir().display()))
            .flag("--shutdown-grace-period=3s");
        AgentCommand::new(flags, &self.sts.url)
    }

    fn app_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.app))
    }

    /// The first agent on the node, ready, with every pod's credentials fetched.
    async fn first_agent(&self) -> AgentProcess {
        let mut agent = self.agent().spawn();
        agent.wait_ready().await;
        let pods = 1 + RAW_PODS.len();
        // Cached, not just asked for: a call STS has not answered yet is not handed over.
        let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
        eventually(30, "every pod's credentials prefetched", async || {
            agent.metric(fetched).await.is_some_and(|n| n >= pods as f64)
        })
        .await;
        agent
    }

    /// A successor started beside `predecessor`, once it has taken over (it says so), and
    /// the predecessor after its SIGTERM (it must exit 0). Returns the successor and what
    /// the predecessor logged.
    async fn roll(&self, predecessor: AgentProcess) -> (AgentProcess, String) {
        let successor = self.agent().spawn();
        eventually(30, "the successor to take over", async || {
            successor.log().contains("took over from the predecessor")
        })
        .await;
        let log = predecessor.log();
        assert!(log.contains("handed over to the successor"), "{log}");
        (successor, predecessor.terminate().await)
    }
}

/// Pods asking all the time, each request on a new connection from its own address, as
/// SDKs do: every failure (refused connection, error status) is kept, with the time.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(app: SocketAddr) -> Self {
        let (stop, served) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let mut tasks: Vec<_> = RAW_PODS
            .iter()
            .map(|ip| {
                let (stop, served, ip) = (stop.clone(), served.clone(), ip.parse::<IpAddr>().unwrap());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match pod_client::try_get(ip, app, CREDS).await {
                            Ok(reply) if reply.status == 200 => drop(served.fetch_add(1, Ordering::Relaxed)),
                            Ok(reply) => failures.push(format!("{ip}: {} {}", reply.status, reply.body)),
                            Err(error) => failures.push(format!("{ip}: {error}")),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    failures
                })
            })
            .collect();
        // aws-config's client, one object, keeping its connection and its token throughout.
        let (stop_sdk, served_sdk) = (stop.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let sdk = aws_config_client(app);
            let mut failures = Vec::new();
            while !stop_sdk.load(Ordering::Relaxed) {
                match sdk.get(CREDS).await {
                    Ok(_) => drop(served_sdk.fetch_add(1, Ordering::Relaxed)),
                    Err(error) => failures.push(format!("aws-config: {error:?}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failures
        }));
        Self { stop, served, tasks }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.unwrap());
        }
        (self.served.load(Ordering::Relaxed), failures)
    }
}

/// aws-config's IMDS client, one object for the whole test, as an SDK keeps it: its token
/// (6 hours by default) is fetched once and kept. One attempt per call, so no failure hides
/// behind a retry.
fn aws_config_client(app: SocketAddr) -> ImdsClient {
    ImdsClient::builder().endpoint(format!("http://{app}")).unwrap().max_attempts(1).build()
}

#[tokio::test]
async fn five_rolling_updates_under_load_refuse_nothing_and_call_sts_for_nothing() {
    let node = Node::start().await;
    let mut agent = node.first_agent().await;
    let calls_before = node.sts.assume_role_calls().len();

    let sdk = aws_config_client(node.app_addr());
    let first = sdk.get(CREDS).await.expect("aws-config's first call");
    let stop = node.state.path().join("stop");
    let botocore = BotocoreLoop::start(None, &format!("http://{}/", node.app_addr()), &stop);
    let load = Load::start(node.app_addr());
    let mut sdk_failures = Vec::new();
    for update in 0..5 {
        agent = node.roll(agent).await.0;
        // aws-config, with the token it took before the first update, after each.
        match sdk.get(CREDS).await {
            Ok(credentials) => assert_eq!(credentials.as_ref(), first.as_ref(), "the same cached credentials"),
            Err(error) => sdk_failures.push(format!("update {update}: {error}")),
        }
    }
    let (served, failures) = load.finish().await;
    let botocore = botocore.finish(&stop).await;

    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), served + failures.len());
    assert!(served > 100, "the load ran throughout ({served} requests)");
    assert!(sdk_failures.is_empty(), "aws-config, one client object: {sdk_failures:?}");
    assert_eq!(botocore["failures"], serde_json::json!([]), "botocore: {botocore}");
    assert!(botocore["served"].as_u64().unwrap() > 10, "{botocore}");
    let calls = node.sts.assume_role_calls().len() - calls_before;
    assert_eq!(calls, 0, "AssumeRole calls during the updates");
    agent.terminate().await;
}

#[tokio::test]
async fn after_a_kill_9_a_token_from_before_still_works_and_the_pod_is_served() {
    let node = Node::start().await;
    let agent = node.first_agent().await;
    let sdk = aws_config_client(node.app_addr());
    sdk.get(CREDS).await.expect("a token taken and used");
    let token = pod_client::token(RAW_PODS[0], node.app_addr()).await;

    agent.signal(Signal::SIGKILL);
    let mut successor = node.agent().spawn();
    // The first request may come before the successor listens: retried as SDKs do, until
    // the agent answers.
    let mut reply = None;
    eventually(30, "the successor to answer", async || {
        let attempt = Connection::open(Some(RAW_PODS[0].parse().unwrap()), node.app_addr()).await;
        let Ok(mut connection) = attempt else { return false };
        match connection.send("GET", CREDS, &[("x-aws-ec2-metadata-token", &token)]).await {
            Ok(answer) => {
                reply = Some(pod_client::Reply::from(answer));
                true
            }
            Err(_) => false,
        }
    })
    .await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200, "a token issued before the crash: {reply:?}");
    assert!(successor.log().contains("token key read from the state directory"), "{}", successor.log());
    sdk.get(CREDS).await.expect("aws-config, its token kept across the crash");
    successor.wait_ready().await;
    successor.terminate().await;
}

#[tokio::test]
async fn after_a_kill_9_the_pods_that_asked_in_the_minutes_before_are_prefetched_first() {
    let node = Node::start().await;
    let jobs = 30;
    for i in 0..jobs {
        node.api.create_pod(pod("batch", &format!("job-{i}")).ip(&format!("127.0.1.{}", 10 + i)).role(ROLE).build());
    }
    let pods = 1 + RAW_PODS.len() + jobs;
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    let agent = node.agent().spawn();
    eventually(30, "every pod's credentials prefetched", async || {
        agent.metric(fetched).await.is_some_and(|n| n >= pods as f64)
    })
    .await;
    // Two pods far down the listing (by creation or by name) ask; the agent writes that down.
    let askers = ["batch.job-27", "batch.job-8"];
    for ip in ["127.0.1.37", "127.0.1.18"] {
        assert_eq!(pod_client::get(ip, node.app_addr(), CREDS).await.status, 200);
    }
    let file = node.state_dir().join("recent-sessions");
    eventually(30, "the asking pods in the state directory", async || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        askers.iter().all(|session| text.contains(&format!(" {session}\n")))
    })
    .await;

    agent.signal(Signal::SIGKILL);
    let before = node.sts.assume_role_calls().len();
    // Every AssumeRole slow enough that the first turns are still under way when the whole
    // listing's prefetches have queued (the order applies among calls that wait).
    node.sts.set_delay(Duration::from_millis(200));
    let mut successor = node.agent().spawn();
    eventually(60, "every pod's credentials prefetched again", async || {
        successor.metric(fetched).await.is_some_and(|n| n >= pods as f64)
    })
    .await;
    let order: Vec<String> =
        node.sts.assume_role_calls()[before..].iter().map(|call| call["RoleSessionName"].clone()).collect();
    assert_eq!(order.len(), pods, "one call per pod: {order:?}");
    // Prefetches take 4 of the 16 turns at once: the first 4 start in the listing's order,
    // the asking pods' right after.
    for session in askers {
        let at = order.iter().position(|name| name == session).unwrap();
        assert!(at < 6, "{session} was call {} of {pods} after the crash: {order:?}", at + 1);
    }
    assert!(successor.log().contains("their prefetches go first"), "{}", successor.log());
    successor.wait_ready().await;
    successor.terminate().await;
}

#[tokio::test]
async fn a_predecessor_speaking_another_protocol_makes_the_successor_start_cold() {
    let node = Node::start().await;
    // A predecessor of another version: it answers any hello with a refusal.
    let dir = node.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let socket = tokio::net::UnixListener::bind(dir.join("handover.sock")).unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = socket.accept().await.unwrap();
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.unwrap();
        let mut hello = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut hello).await.unwrap();
        let refused = br#"{"type":"refused","protocol":99,"reason":"protocol 99 only"}"#;
        stream.write_all(&(refused.len() as u32).to_be_bytes()).await.unwrap();
        stream.write_all(refused).await.unwrap();
        String::from_utf8(hello).unwrap()
    });
    let mut agent = node.agent().spawn();
    agent.wait_ready().await;
    let hello = fake.await.unwrap();
    assert!(hello.contains(r#""type":"hello","protocol":1"#), "{hello}");
    let log = agent.log();
    assert!(log.contains("no hand-over from the predecessor: starting cold"), "{log}");
    assert!(log.contains("protocol 99"), "the reason is said: {log}");
    eventually(30, "a cold start's prefetch", async || node.sts.assume_role_calls().len() >= 4).await;
    assert_eq!(pod_client::get(RAW_PODS[1], node.app_addr(), CREDS).await.status, 200);
    agent.terminate().await;
}

#[tokio::test]
async fn a_successor_speaking_another_protocol_gets_nothing_and_the_agent_keeps_serving() {
    let node = Node::start().await;
    let agent = node.first_agent().await;
    let mut stream = tokio::net::UnixStream::connect(node.state_dir().join("handover.sock")).await.unwrap();
    let hello = br#"{"type":"hello","protocol":99,"pid":1}"#;
    stream.write_all(&(hello.len() as u32).to_be_bytes()).await.unwrap();
    stream.write_all(hello).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains(r#""type":"refused""#) && text.contains("protocol 99"), "{text}");
    assert!(!text.contains("offer"), "no sockets, no credentials: {text}");
    assert_eq!(pod_client::get(RAW_PODS[0], node.app_addr(), CREDS).await.status, 200);
    // And a real successor still takes over afterwards.
    let (successor, _) = node.roll(agent).await;
    successor.terminate().await;
}

#[tokio::test]
#[ignore = "needs root (to play another uid): scripts/test.sh runs it as root"]
async fn only_iamlets_uid_may_take_over_and_nothing_secret_is_logged() {
    iamlet_testkit::netns::require_root();
    let node = Node::start().await;
    let agent = node.first_agent().await;
    let token = pod_client::token(RAW_PODS[0], node.app_addr()).await;
    let creds =
        pod_client::request(RAW_PODS[0], node.app_addr(), "GET", CREDS, &[("x-aws-ec2-metadata-token", &token)])
            .await
            .json();

    // The directory keeps everyone else out; opened up, the agent itself still refuses a
    // peer that is not root.
    use std::os::unix::fs::PermissionsExt;
    let dir = node.state_dir();
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    for file in ["token-key", "handover.sock"] {
        assert_eq!(std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777, 0o600, "{file}");
    }
    std::fs::set_permissions(node.state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("handover.sock"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
hello = b'{"type":"hello","protocol":1,"pid":1}'
# The agent may close before the hello is even written: nothing for this peer either way.
try:
    s.sendall(struct.pack(">I", len(hello)) + hello)
    data, fds, flags, addr = socket.recv_fds(s, 65536, 8)
except (BrokenPipeError, ConnectionResetError):
    data, fds = b"", []
print(len(data), len(fds))
"#;
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script])
        .arg(dir.join("handover.sock"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0 0", "no byte and no socket for uid 65534");
    eventually(10, "the refusal logged", async || agent.log().contains("refused a peer with uid 65534")).await;

    let (successor, predecessor_log) = node.roll(agent).await;
    let log = format!("{predecessor_log}{}", successor.log());
    successor.terminate().await;
    for secret in [creds["SecretAccessKey"].as_str().unwrap(), creds["Token"].as_str().unwrap(), &token] {
        assert!(!log.contains(secret), "a secret in the successor's log");
    }
    let key = std::fs::read_to_string(dir.join("token-key")).unwrap();
    let key = key.lines().find_map(|line| line.strip_prefix("key ")).unwrap();
    assert!(!log.contains(key), "the token key in the log");
}

#[tokio::test]
#[ignore = "needs root (to play another uid): scripts/test.sh runs it as root"]
async fn a_port_taken_by_another_user_while_no_agent_runs_is_named_not_waited_for() {
    iamlet_testkit::netns::require_root();
    let node = Node::start().await;
    // While no agent runs (after a crash, its rules kept), an unprivileged process binds the
    // metadata port and answers whoever connects: the attack, shown working.
    let script = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nevil")
    c.close()
"#;
    let mut squatter = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script])
        .arg(node.app.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(squatter.stdout.as_mut().unwrap()), &mut ready).unwrap();
    assert_eq!(ready.trim(), "listening");
    let answer = pod_client::get(RAW_PODS[0], node.app_addr(), CREDS).await;
    assert_eq!(answer.body, "evil", "the squatter answers the pods");

    // iamlet does not wait for it as for a predecessor: it says who holds the port, and stops.
    let mut agent = node.agent().spawn();
    let status = agent.exit(Duration::from_secs(20)).await;
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("a process of uid 65534, not iamlet's, holds it"), "{log}");
}
