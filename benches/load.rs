//! The load benchmark: what operators care about, measured on this machine, side by side with
//! nginx serving a static file of the same size in the same run.
//!
//! `scripts/bench.sh` (or `cargo bench --bench load`) starts the fake API server with pods on
//! the node (IPs spread over 127.0.0.0/8), moto as STS behind a recording proxy, and the
//! release `iamlet` binary as its own process, then measures:
//!
//! 1. cached credentials in steady state: throughput and latency, keep-alive on and off,
//!    IMDSv1 and IMDSv2, from many source IPs; and latency at a fixed 10,000 requests/s;
//! 2. nginx on the same connection patterns: the iamlet/nginx ratios are the figures to quote;
//! 3. cold start: pod creation to first credentials, 100 pods;
//! 4. scale: RSS after sync with 110 and 5,000 pods, RSS over a sustained load, startup to ready;
//! 5. STS calls per distinct (role, pod);
//! 6. the restart gap: SIGTERM, then the successor's process start to a pod's first
//!    credentials, with 110 pods (during a rolling update pods are refused for that long);
//! 7. exhaustion: slow-header connections, a flood from unknown IPs and one pod opening
//!    connections in a loop, while a known pod keeps asking: its latency, refusals, RSS;
//! 8. churn: three cycles of 1,000 pods created, given credentials and deleted: RSS after each,
//!    at once and settled, against the settled baseline (what stays above it is the leak signal);
//! 9. the pod port binding (as root): credential latency from a pod on a `cni0` bridge through
//!    the real DNAT with `--bind-pod-ports` off and on, side by side, and the time from a pod's
//!    CNI record to its binding in the kernel, pod by pod up to 110.
//!
//! It prints a table and writes target/bench/load.json. `--quick` shortens every phase;
//! `--churn-only` runs a 110-pod node through the churn phase alone; `--binding-only` the
//! binding phase alone; `--startup-only` cold start and the restart gap alone (run it
//! alternately with two builds as `IAMLET_BIN` to compare them).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iamlet_testkit::agent::{self, AgentCommand, AgentProcess};
use iamlet_testkit::apiserver::{self, FakeApiServer};
use iamlet_testkit::e2e::E2e;
use iamlet_testkit::imds::FakeImds;
use iamlet_testkit::netns::Attach;
use iamlet_testkit::pod_client::{Connection, tcp_from, try_get};
use iamlet_testkit::sts_proxy::StsProxy;
use iamlet_testkit::{AgentFlags, free_port};
use serde_json::{Value, json};

const ROLE: &str = "bench-role";
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/bench-role";
/// A full node's pods.
const NODE_PODS: usize = 110;
/// A very busy node's pods.
const BIG_NODE_PODS: usize = 5_000;

/// How long each phase runs.
struct Durations {
    load: Duration,
    soak: Duration,
    cold_pods: usize,
    restarts: usize,
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 10, (i / 250) as u8, (i % 250 + 2) as u8))
}

/// The fakes a node's agent talks to.
struct Fakes {
    api: FakeApiServer,
    sts: StsProxy,
    imds: FakeImds,
    /// The CNI configuration and libcni's results the agent is pointed at (empty), so its
    /// container's mounts are made here, never in the host's `/etc/cni` or `/var/lib/cni`.
    cni: tempfile::TempDir,
}

impl Fakes {
    async fn start() -> Self {
        let cni = tempfile::tempdir().unwrap();
        for dir in ["net.d", "results"] {
            std::fs::create_dir(cni.path().join(dir)).unwrap();
        }
        Self { api: FakeApiServer::start().await, sts: StsProxy::start().await, imds: FakeImds::start().await, cni }
    }

    /// The agent as its own process (so its memory is its own), on these ports: a successor
    /// takes its predecessor's (the DNAT target does not change).
    fn spawn_agent(&self, app_port: u16, admin_port: u16) -> AgentProcess {
        self.agent(app_port, admin_port).spawn()
    }

    /// A successor beside the agent on these ports, logging at info (it says when it took over).
    fn spawn_successor(&self, app_port: u16, admin_port: u16) -> AgentProcess {
        self.agent_logging(app_port, admin_port, "info").spawn()
    }

    fn agent(&self, app_port: u16, admin_port: u16) -> AgentCommand {
        self.agent_logging(app_port, admin_port, "warn")
    }

    fn agent_logging(&self, app_port: u16, admin_port: u16, level: &str) -> AgentCommand {
        let flags = AgentFlags::loopback(&self.api.url, &self.imds.addr)
            .without_startup_taint()
            .ports(app_port, admin_port)
            .flag(format!("--log-level={level}"))
            .flag("--debug");
        // The CNI and state directories through the environment, not flags: a build older than a flag
        // ignores the variable, so old and new builds run the same benchmark (`IAMLET_BIN`).
        // The node's STS budget is lifted: moto never throttles, and the phases measure how
        // fast iamlet itself fetches (5,000 pods, restarts), not the budget's rate.
        let dir = |name: &str| self.cni.path().join(name).display().to_string();
        AgentCommand::new(flags, &self.sts.url)
            .env("IAMLET_CNI_CONF_DIR", &dir("net.d"))
            .env("IAMLET_CNI_RESULTS_DIR", &dir("results"))
            .env("IAMLET_STATE_DIR", &dir("state"))
            .env("IAMLET_STS_MAX_RPS", "10000")
            .env("IAMLET_STS_BURST", "10000")
    }

    fn create_pods(&self, range: std::ops::Range<usize>) {
        for i in range {
            self.api
                .create_pod(apiserver::pod("bench", &format!("pod-{i}")).ip(&pod_ip(i).to_string()).role(ROLE).build());
        }
    }

    /// An agent on a node with `pods` pods, each with the role; returns it with its time to
    /// ready and the time from ready until every pod's credentials were fetched.
    async fn start_node(&self, pods: usize) -> (AgentProcess, Duration, Duration) {
        self.create_pods(0..pods);
        let mut agent = self.spawn_agent(free_port(), free_port());
        let ready = agent.wait_ready().await;
        let prefetch = wait_prefetched(&agent, pods).await;
        (agent, ready, prefetch)
    }
}

/// A metric of the agent's, 0 until exported.
async fn metric(agent: &AgentProcess, selector: &str) -> f64 {
    agent.metric(selector).await.unwrap_or(0.0)
}

/// Waits until every pod is indexed and its credentials fetched; fails after a minute.
async fn wait_prefetched(agent: &AgentProcess, pods: usize) -> Duration {
    let started = Instant::now();
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    while metric(agent, fetched).await < pods as f64 || metric(agent, "iamlet_pods_indexed").await < pods as f64 {
        assert!(started.elapsed() < Duration::from_secs(60), "prefetch incomplete after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Whether the pod at `from` got its credentials on a connection of its own.
async fn credentials_served(from: IpAddr, agent: &AgentProcess) -> bool {
    try_get(from, agent.app, CREDS_PATH).await.is_ok_and(|reply| reply.status == 200)
}

/// A load pattern.
#[derive(Clone)]
struct Load {
    target: SocketAddr,
    path: &'static str,
    sources: Arc<Vec<IpAddr>>,
    connections: usize,
    keepalive: bool,
    imdsv2: bool,
    /// Requests per second in all (open loop, latency from the scheduled send time), or
    /// as fast as possible (closed loop) when `None`.
    rate: Option<u64>,
    duration: Duration,
}

struct LoadResult {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
    fn json(&self) -> Value {
        json!({"requests": self.requests, "errors": self.errors, "rps": self.rps().round(),
               "p50_ms": self.percentile_ms(0.5), "p99_ms": self.percentile_ms(0.99), "p999_ms": self.percentile_ms(0.999)})
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// One request of a load connection: a token first if IMDSv2 and none yet, on a connection
/// opened if none is open.
async fn load_request(
    load: &Load,
    source: IpAddr,
    connection: &mut Option<Connection>,
    token: &mut String,
) -> Result<u16, String> {
    if connection.is_none() {
        let mut fresh = Connection::open(Some(source), load.target).await?;
        if load.imdsv2 && token.is_empty() {
            let reply =
                fresh.send("PUT", "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")]).await?;
            *token = String::from_utf8_lossy(reply.body()).into_owned();
        }
        *connection = Some(fresh);
    }
    let mut headers = Vec::with_capacity(2);
    if load.imdsv2 {
        headers.push(("x-aws-ec2-metadata-token", token.as_str()));
    }
    if !load.keepalive {
        headers.push(("connection", "close"));
    }
    let sender = connection.as_mut().expect("opened above");
    Ok(sender.send("GET", load.path, &headers).await?.status().as_u16())
}

/// One connection's loop until the deadline; its latency histogram.
async fn load_connection(load: Load, c: usize, start: Instant, errors: Arc<AtomicU64>) -> Histogram<u64> {
    let deadline = start + load.duration;
    let mut histogram = histogram();
    let source = load.sources[c % load.sources.len()];
    let mut token = String::new();
    let interval = load.rate.map(|r| Duration::from_secs_f64(load.connections as f64 / r as f64));
    let mut next = start + interval.map(|i| i.mul_f64(c as f64 / load.connections as f64)).unwrap_or_default();
    let mut connection: Option<Connection> = None;
    while Instant::now() < deadline {
        // Open loop: latency counts from the scheduled send time when the previous answer
        // came late (coordinated omission), else from the actual send, so the timer's own lag
        // (tokio's is up to 1 ms) is not charged to the server.
        let scheduled = match interval {
            Some(_) if Instant::now() > next => next,
            Some(_) => {
                tokio::time::sleep_until(next.into()).await;
                Instant::now()
            }
            None => Instant::now(),
        };
        match load_request(&load, source, &mut connection, &mut token).await {
            Ok(200) => histogram.saturating_record(scheduled.elapsed().as_micros().max(1) as u64),
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                connection = None;
            }
        }
        if !load.keepalive {
            connection = None;
        }
        if let Some(step) = interval {
            next += step;
        }
    }
    histogram
}

async fn run_load(load: Load) -> LoadResult {
    let start = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> =
        (0..load.connections).map(|c| tokio::spawn(load_connection(load.clone(), c, start, errors.clone()))).collect();
    let mut latency = histogram();
    for task in tasks {
        latency.add(task.await.unwrap()).unwrap();
    }
    LoadResult { requests: latency.len(), errors: errors.load(Ordering::Relaxed), elapsed: start.elapsed(), latency }
}

/// nginx serving `body` at `/creds` on loopback, with as many workers as cores.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(body: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("creds"), body).unwrap();
        for path in [dir.path(), root.as_path()] {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let port = free_port();
        let config = format!(
            "worker_processes auto;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {dir}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ root {root}; default_type text/plain; }} }} }}\n",
            dir = dir.path().display(),
            root = root.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let child = Command::new("nginx")
            .args(["-c", dir.path().join("nginx.conf").to_str().unwrap(), "-p", dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nginx: scripts/bench.sh installs it");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn row(name: &str, r: &LoadResult, reference: Option<&LoadResult>) -> String {
    let ratio = reference.map(|n| format!("{:.2}", r.rps() / n.rps())).unwrap_or_else(|| "-".into());
    format!(
        "| {name:<44} | {:>9.0} | {:>7.3} | {:>7.3} | {:>7.3} | {:>6} | {ratio:>5} |",
        r.rps(),
        r.percentile_ms(0.5),
        r.percentile_ms(0.99),
        r.percentile_ms(0.999),
        r.errors
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let durations = if quick {
        Durations { load: Duration::from_secs(2), soak: Duration::from_secs(20), cold_pods: 30, restarts: 5 }
    } else {
        Durations { load: Duration::from_secs(8), soak: Duration::from_secs(300), cold_pods: 100, restarts: 11 }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if std::env::args().any(|a| a == "--churn-only") {
        runtime.block_on(churn_only());
        return;
    }
    if std::env::args().any(|a| a == "--startup-only") {
        let report = runtime.block_on(startup_only(&durations));
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
        return;
    }
    if std::env::args().any(|a| a == "--binding-only") {
        let report = runtime.block_on(binding(&durations));
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
        return;
    }
    runtime.block_on(bench(durations));
}

/// `--churn-only`: a node of 110 pods, then the churn phase alone (looking for a leak).
async fn churn_only() {
    let fakes = Fakes::start().await;
    let (agent, _, _) = fakes.start_node(NODE_PODS).await;
    println!("{}", serde_json::to_string_pretty(&churn(&fakes.api, &agent).await).unwrap());
}

/// `--startup-only`: a node of 110 pods, then cold start, crash restarts and rolling updates
/// alone, to compare two builds side by side (run it alternately with each as `IAMLET_BIN`).
async fn startup_only(d: &Durations) -> Value {
    let fakes = Fakes::start().await;
    let (agent, _, _) = fakes.start_node(NODE_PODS).await;
    let cold_start = cold_start(&fakes.api, &agent, d.cold_pods).await;
    let (restart_gap, agent) = restart_gap(&fakes, agent, NODE_PODS, NODE_PODS + d.cold_pods, d.restarts).await;
    json!({"binary": iamlet_testkit::agent::binary(), "cold_start": cold_start, "restart_gap": restart_gap,
           "rolling_update": rolling_update(&fakes, agent, NODE_PODS, NODE_PODS + d.cold_pods, d.restarts).await})
}

/// Every phase in order, on one node (and a second, very busy one for scale); the report.
async fn bench(d: Durations) {
    let mut report = json!({"machine": machine(), "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()});
    let fakes = Fakes::start().await;
    let (agent, ready, prefetch) = fakes.start_node(NODE_PODS).await;
    let (rss, anon) = agent.rss_mib();
    println!(
        "iamlet ready in {:.0} ms with {NODE_PODS} pods; credentials prefetched {:.0} ms later; RSS {rss:.1} MiB ({anon:.1} MiB anonymous)",
        ms(ready),
        ms(prefetch)
    );
    report["load"] = load(&agent, &d).await;
    report["cold_start"] = cold_start(&fakes.api, &agent, d.cold_pods).await;
    report["soak"] = soak(&agent, d.soak).await;
    report["sts"] = sts_calls(&fakes.sts, NODE_PODS + d.cold_pods, report["soak"]["requests"].as_u64().unwrap_or(0));
    report["sts"]["agent_errors"] = assume_role_errors(&agent.log());
    report["exhaustion"] = exhaustion(&agent).await;
    report["churn"] = churn(&fakes.api, &agent).await;
    let (restart_gap, agent) = restart_gap(&fakes, agent, NODE_PODS, NODE_PODS + d.cold_pods, d.restarts).await;
    report["restart_gap"] = restart_gap;
    report["rolling_update"] = rolling_update(&fakes, agent, NODE_PODS, NODE_PODS + d.cold_pods, d.restarts).await;
    report["image"] = image(&fakes, d.restarts).await;
    report["scale"] = scale((rss, anon, ready)).await;
    report["binding"] = binding(&d).await;
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/load.json", serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwritten: target/bench/load.json");
}

/// Steady state: cached credentials from every pod of the node, 32 connections, keep-alive
/// on and off, IMDSv1 and v2, against nginx serving the same body; then both at a fixed
/// 10,000 requests/s.
async fn load(agent: &AgentProcess, d: &Durations) -> Value {
    let body = try_get(pod_ip(0), agent.app, CREDS_PATH).await.expect("the first pod's credentials").body;
    let nginx = Nginx::start(body.as_bytes());
    let sources = Arc::new((0..NODE_PODS).map(pod_ip).collect::<Vec<_>>());
    let base = |target, path, keepalive, imdsv2, rate| Load {
        target,
        path,
        sources: sources.clone(),
        connections: 32,
        keepalive,
        imdsv2,
        rate,
        duration: d.load,
    };
    println!(
        "\n| {:<44} | {:>9} | {:>7} | {:>7} | {:>7} | {:>6} | {:>5} |",
        "load (32 connections)", "req/s", "p50 ms", "p99 ms", "p99.9ms", "errors", "/nginx"
    );
    let dashes = [46, 11, 9, 9, 9, 8, 7].map(|n| "-".repeat(n));
    println!("|{}|", dashes.join("|"));
    let mut loads = serde_json::Map::new();
    for (keepalive, label) in [(true, "keep-alive"), (false, "new connection per request")] {
        let reference = run_load(base(nginx.addr, "/creds", keepalive, false, None)).await;
        println!("{}", row(&format!("nginx static file, {label}"), &reference, None));
        loads.insert(format!("nginx_{label}"), reference.json());
        for imdsv2 in [false, true] {
            let result = run_load(base(agent.app, CREDS_PATH, keepalive, imdsv2, None)).await;
            let name = format!("iamlet {}, {label}", if imdsv2 { "IMDSv2" } else { "IMDSv1" });
            println!("{}", row(&name, &result, Some(&reference)));
            let mut entry = result.json();
            entry["ratio_to_nginx"] = json!((result.rps() / reference.rps() * 100.0).round() / 100.0);
            loads.insert(name, entry);
        }
    }
    for (target, name, path) in [
        (nginx.addr, "nginx at 10,000 req/s, keep-alive", "/creds"),
        (agent.app, "iamlet IMDSv2 at 10,000 req/s, keep-alive", CREDS_PATH),
    ] {
        let result = run_load(base(target, path, true, name.starts_with("iamlet"), Some(10_000))).await;
        println!("{}", row(name, &result, None));
        loads.insert(name.to_string(), result.json());
    }
    Value::Object(loads)
}

/// Cold start: a pod is created and asks at once; the agent waits for the watch, prefetch and
/// STS (moto) run concurrently with the wait.
async fn cold_start(api: &FakeApiServer, agent: &AgentProcess, pods: usize) -> Value {
    let mut cold = histogram();
    let mut errors = 0;
    for i in 0..pods {
        let index = 50_000 + i;
        let started = Instant::now();
        api.create_pod(apiserver::pod("bench", &format!("cold-{i}")).ip(&pod_ip(index).to_string()).role(ROLE).build());
        if credentials_served(pod_ip(index), agent).await {
            cold.saturating_record(started.elapsed().as_micros() as u64);
        } else {
            errors += 1;
        }
    }
    let (median, p99) = (cold.value_at_quantile(0.5) as f64 / 1000.0, cold.value_at_quantile(0.99) as f64 / 1000.0);
    println!(
        "\ncold start, pod creation to credentials ({pods} pods): median {median:.1} ms, p99 {p99:.1} ms, errors {errors}"
    );
    json!({"pods": pods, "median_ms": median, "p99_ms": p99, "errors": errors})
}

/// Sustained IMDSv2 load at 2,000 requests/s, RSS sampled every 2 s: growth after warm-up is
/// the leak signal.
async fn soak(agent: &AgentProcess, duration: Duration) -> Value {
    let load = Load {
        target: agent.app,
        path: CREDS_PATH,
        sources: Arc::new((0..NODE_PODS).map(pod_ip).collect()),
        connections: 32,
        keepalive: true,
        imdsv2: true,
        rate: Some(2_000),
        duration,
    };
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (running, pid) = (running.clone(), agent.pid());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while running.load(Ordering::Relaxed) {
                samples.push(agent::rss_mib(pid).0);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            samples
        })
    };
    let result = run_load(load).await;
    running.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let warm = samples.get(samples.len() / 5).copied().unwrap_or(0.0);
    let last = samples.last().copied().unwrap_or(0.0);
    println!(
        "sustained load, {:.0} s at 2,000 req/s IMDSv2: {} requests, {} errors; RSS {warm:.1} MiB after warm-up -> {last:.1} MiB at the end",
        duration.as_secs_f64(),
        result.requests,
        result.errors
    );
    json!({"seconds": duration.as_secs(), "requests": result.requests, "errors": result.errors,
           "rss_warm_mib": warm, "rss_end_mib": last, "p99_ms": result.percentile_ms(0.99)})
}

/// STS calls so far against the distinct (role, pod) keys: one each is the cache working.
/// A key called more than once is named, with how each of its calls ended (STS's status, or
/// abandoned by the agent at `--sts-timeout`), so that an excess can be told apart: a failed
/// call retried after `--iam-role-error-ttl`, or a key dropped and assumed again.
fn sts_calls(sts: &StsProxy, keys: usize, requests: u64) -> Value {
    use iamlet_testkit::sts_proxy::OUTCOME;
    let calls = sts.assume_role_calls();
    let mut by_key: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for call in &calls {
        let key = (
            call.get("RoleArn").cloned().unwrap_or_default(),
            call.get("RoleSessionName").cloned().unwrap_or_default(),
        );
        by_key.entry(key).or_default().push(call.get(OUTCOME).cloned().unwrap_or_default());
    }
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for call in &calls {
        *outcomes.entry(call.get(OUTCOME).cloned().unwrap_or_default()).or_default() += 1;
    }
    let repeated: Vec<Value> = by_key
        .iter()
        .filter(|(_, ended)| ended.len() > 1)
        .map(|((role, session), ended)| json!({"role": role, "session": session, "calls": ended}))
        .collect();
    println!(
        "STS AssumeRole calls: {} for {keys} distinct (role, pod) keys ({} keys seen), over {requests} requests; outcomes {outcomes:?}",
        calls.len(),
        by_key.len()
    );
    for entry in &repeated {
        println!("  called more than once: {} {} -> {}", entry["role"], entry["session"], entry["calls"]);
    }
    json!({"calls": calls.len(), "distinct_keys": keys, "keys_seen": by_key.len(), "outcomes": outcomes, "repeated": repeated})
}

/// What the agent logged for each AssumeRole that failed (`AssumeRole failed ... error=...`),
/// counted by error: why a key needed a second call.
fn assume_role_errors(log: &str) -> Value {
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for line in log.lines().filter(|line| line.contains("AssumeRole failed")) {
        let error = line.split("error=").nth(1).unwrap_or(line).trim().to_string();
        *errors.entry(error).or_default() += 1;
    }
    for (error, count) in &errors {
        println!("  the agent logged {count} x AssumeRole failed: {error}");
    }
    json!(errors)
}

/// Hostile load against the agent's default limits, while the pod at `pod_ip(0)` asks for its
/// credentials on a new connection each time: 1,000 connections trickling their headers from
/// 250 unknown IPs, 200 requests at a time from unknown IPs (each held for the watch wait), and
/// one IP opening 200 connections (64 are allowed).
async fn exhaustion(agent: &AgentProcess) -> Value {
    const SLOW: usize = 1000;
    const FLOOD: usize = 200;
    const GREEDY: usize = 200;
    let unknown = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 200, (i / 250) as u8, (i % 250 + 2) as u8));
    let mut slow = Vec::new();
    for i in 0..SLOW {
        if let Ok(mut stream) = tcp_from(Some(unknown(i / 4)), agent.app).await {
            use tokio::io::AsyncWriteExt as _;
            let _ = stream.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254").await;
            slow.push(stream);
        }
    }
    let mut greedy = Vec::new();
    for _ in 0..GREEDY {
        if let Ok(stream) = tcp_from(Some(IpAddr::V4(Ipv4Addr::new(127, 201, 0, 2))), agent.app).await {
            greedy.push(stream);
        }
    }
    let running = Arc::new(AtomicBool::new(true));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (running, app) = (running.clone(), agent.app);
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    let _ = try_get(unknown(300 + i), app, CREDS_PATH).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // the flood's first requests are waiting
    let mut known = histogram();
    let mut errors = 0;
    for _ in 0..500 {
        let started = Instant::now();
        if credentials_served(pod_ip(0), agent).await {
            known.saturating_record(started.elapsed().as_micros() as u64);
        } else {
            errors += 1;
        }
    }
    let (rss, _) = agent.rss_mib();
    running.store(false, Ordering::Relaxed);
    for task in flood {
        let _ = task.await;
    }
    let refused = metric(agent, "iamlet_connections_refused_total{reason=\"per-ip\"}").await
        + metric(agent, "iamlet_connections_refused_total{reason=\"total\"}").await;
    drop((slow, greedy));
    let (p50, p99) = (known.value_at_quantile(0.5) as f64 / 1000.0, known.value_at_quantile(0.99) as f64 / 1000.0);
    println!(
        "exhaustion ({SLOW} slow-header connections, {FLOOD} unknown-IP requests in flight, one pod opening {GREEDY} connections): \
         a known pod's p50 / p99 {p50:.2} / {p99:.2} ms, {errors} errors; {refused} connections refused; RSS {rss:.1} MiB"
    );
    json!({"slow_connections": SLOW, "flood_in_flight": FLOOD, "greedy_attempts": GREEDY,
           "known_p50_ms": p50, "known_p99_ms": p99, "known_errors": errors, "refused": refused, "rss_mib": rss})
}

/// Memory over pod churn: three cycles in which 1,000 pods appear (their credentials are
/// prefetched) and are deleted, back to the pods the node had. RSS (all, anonymous) settled
/// before the first cycle, then after each: at once, and settled. Settled figures above the
/// baseline are the leak signal.
async fn churn(api: &FakeApiServer, agent: &AgentProcess) -> Value {
    const PODS: usize = 1000;
    const CYCLES: usize = 3;
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    let base = metric(agent, "iamlet_pods_indexed").await;
    let baseline = settled_rss(agent).await;
    let (mut at_once, mut settled) = (Vec::new(), Vec::new());
    for cycle in 0..CYCLES {
        let before = metric(agent, fetched).await;
        let names: Vec<String> = (0..PODS).map(|i| format!("churn-{cycle}-{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            let ip = pod_ip(20_000 + cycle * PODS + i).to_string();
            api.create_pod(apiserver::pod("bench", name).ip(&ip).role(ROLE).build());
        }
        let started = Instant::now();
        while metric(agent, fetched).await < before + PODS as f64 {
            assert!(started.elapsed() < Duration::from_secs(120), "churn prefetch incomplete");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for name in &names {
            api.delete_pod("bench", name);
        }
        while metric(agent, "iamlet_pods_indexed").await > base {
            assert!(started.elapsed() < Duration::from_secs(180), "churn deletions not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        at_once.push(agent.rss_mib());
        settled.push(settled_rss(agent).await);
    }
    let show =
        |pairs: &[(f64, f64)]| pairs.iter().map(|(rss, anon)| format!("{rss:.1} ({anon:.1})")).collect::<Vec<_>>();
    println!(
        "churn, {CYCLES} cycles of {PODS} pods created and deleted: RSS (anonymous) MiB: baseline {:.1} ({:.1}); \
         after each cycle at once {}; settled {}",
        baseline.0,
        baseline.1,
        show(&at_once).join(", "),
        show(&settled).join(", ")
    );
    json!({"pods_per_cycle": PODS, "baseline_mib": baseline, "at_once_mib": at_once, "settled_mib": settled})
}

/// RSS (all, anonymous) that stays: read 30 s after a burst, since the allocator hands freed
/// pages back to the kernel over about 10 s (jemalloc's decay).
async fn settled_rss(agent: &AgentProcess) -> (f64, f64) {
    tokio::time::sleep(Duration::from_secs(30)).await;
    agent.rss_mib()
}

/// A crash restart, `restarts` times: SIGKILL (no hand-over, no drain), then a successor on
/// the same ports and state directory, as the kubelet restarts a crashed container. Each gap
/// runs from the successor's process start until a pod (a different one each time, asking as
/// soon as anything answers) gets its credentials: while iamlet's rules are kept, that is how
/// long pods are refused. Also counted: the AssumeRole calls each crash costs (every one of
/// the node's `with_roles` pods' credentials fetched again, once).
async fn restart_gap(
    fakes: &Fakes,
    mut agent: AgentProcess,
    pods: usize,
    with_roles: usize,
    restarts: usize,
) -> (Value, AgentProcess) {
    let (app_port, admin_port) = (agent.app.port(), agent.admin.port());
    let mut gaps = Vec::new();
    let mut calls = Vec::new();
    for restart in 0..restarts {
        agent.signal(nix::sys::signal::Signal::SIGKILL);
        agent.exit(Duration::from_secs(10)).await;
        let before = fakes.sts.assume_role_calls().len();
        agent = fakes.spawn_agent(app_port, admin_port);
        let pod = pod_ip(restart % pods);
        while !credentials_served(pod, &agent).await {
            assert!(agent.uptime() < Duration::from_secs(30), "no credentials 30 s after a restart");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gaps.push(agent.uptime());
        wait_prefetched(&agent, with_roles).await;
        calls.push(fakes.sts.assume_role_calls().len() - before);
    }
    gaps.sort();
    let (median, max) = (ms(gaps[gaps.len() / 2]), ms(*gaps.last().unwrap()));
    println!(
        "crash restart gap, successor's start to a pod's first credentials ({pods} pods, {} restarts): median {median:.0} ms, max {max:.0} ms; AssumeRole calls per crash {calls:?}",
        gaps.len()
    );
    let report = json!({"pods": pods, "restarts": gaps.len(), "median_ms": median, "max_ms": max,
           "all_ms": gaps.iter().map(|g| ms(*g)).collect::<Vec<_>>(), "assume_role_calls": calls});
    (report, agent)
}

/// `updates` rolling updates as a DaemonSet with `maxSurge: 1` makes them: the successor
/// started beside the agent, the predecessor SIGTERMed once the successor says it took over.
/// Meanwhile the node's first `pods` pods ask on a new connection per request (8 at a time):
/// every refused connection and error answer is counted, and the AssumeRole calls the
/// updates cost, once the agent has every one of the node's `with_roles` pods' credentials.
async fn rolling_update(
    fakes: &Fakes,
    mut agent: AgentProcess,
    pods: usize,
    with_roles: usize,
    updates: usize,
) -> Value {
    let (app_port, admin_port) = (agent.app.port(), agent.admin.port());
    wait_prefetched(&agent, with_roles).await;
    let before = fakes.sts.assume_role_calls().len();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (stop, app) = (stop.clone(), agent.app);
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u64, Vec::new());
                let mut i = worker;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match try_get(pod_ip(i % pods), app, CREDS_PATH).await {
                        Ok(reply) if reply.status == 200 => served += 1,
                        Ok(reply) => failed.push(format!("{} {}", reply.status, reply.body.trim())),
                        Err(error) => failed.push(error),
                    }
                    i += 8;
                }
                (served, failed)
            })
        })
        .collect();
    let mut takeovers = Vec::new();
    for _ in 0..updates {
        let successor = fakes.spawn_successor(app_port, admin_port);
        while !successor.log().contains("took over from the predecessor") {
            assert!(successor.uptime() < Duration::from_secs(30), "no takeover in 30 s: {}", successor.log());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        takeovers.push(successor.uptime());
        agent.terminate().await;
        agent = successor;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut served, mut failed) = (0, Vec::new());
    for worker in workers {
        let (s, f) = worker.await.unwrap();
        served += s;
        failed.extend(f);
    }
    let calls = fakes.sts.assume_role_calls().len() - before;
    takeovers.sort();
    let takeover = ms(takeovers[takeovers.len() / 2]);
    println!(
        "rolling updates with maxSurge ({pods} pods, {updates} updates, requests on new connections throughout): {} refused or failed of {}; AssumeRole calls {calls}; successor's start to takeover median {takeover:.0} ms",
        failed.len(),
        served + failed.len() as u64
    );
    for failure in failed.iter().take(5) {
        println!("  {failure}");
    }
    let spread = refresh_spread(&agent).await;
    agent.terminate().await;
    json!({"pods": pods, "updates": updates, "requests": served + failed.len() as u64, "failed": failed.len(),
           "failures": failed.iter().take(20).collect::<Vec<_>>(), "assume_role_calls": calls,
           "takeover_median_ms": takeover, "refresh_spread": spread})
}

/// How far ahead of their expiry the cached credentials are to be refreshed (`/debug/store`):
/// the refresh point (`--iam-role-session-ttl`, 30 minutes by default) plus a random quarter
/// of it at most, so keys fetched together come due apart.
async fn refresh_spread(agent: &AgentProcess) -> Value {
    let Some(store) = agent.admin_get("/debug/store").await else {
        return json!({"measured": false});
    };
    let time = |value: &Value| humantime::parse_rfc3339(value.as_str()?).ok();
    let mut leads: Vec<u64> = store.json()["credentials"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| time(&c["expiration"])?.duration_since(time(&c["refresh_at"])?).ok())
        .map(|lead| lead.as_secs())
        .collect();
    leads.sort();
    let (Some(first), Some(last)) = (leads.first(), leads.last()) else {
        return json!({"measured": false});
    };
    let distinct = leads.iter().collect::<std::collections::BTreeSet<_>>().len();
    println!(
        "refresh points of {} cached credentials: {first} to {last} s before expiry (the TTL, up to a quarter of it earlier), {distinct} distinct",
        leads.len()
    );
    json!({"measured": true, "credentials": leads.len(), "lead_min_s": first, "lead_max_s": last, "distinct": distinct})
}

/// The image (`scripts/image.sh build` around the benchmarked binary): its size, and the
/// container's cold start, `podman run` to ready, beside the process's, alternated so both
/// see the same machine. Needs root and podman (`scripts/install-test-deps.sh` as root).
async fn image(fakes: &Fakes, starts: usize) -> Value {
    let script = iamlet_testkit::repo_root().join("scripts/image.sh");
    let tag = "localhost/iamlet:bench";
    let built = std::process::Command::new(&script).args(["build", agent::binary(), tag]).status();
    if !built.is_ok_and(|status| status.success()) {
        println!("\nimage: not measured (scripts/image.sh build failed: it needs root, podman, runc and debootstrap)");
        return json!({"measured": false});
    }
    let size = |image: &str| -> f64 {
        let output = std::process::Command::new(&script).args(["size", image]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).trim().parse::<f64>().unwrap_or(0.0) / 1e6
    };
    let (total, base) = (size(tag), size("docker.io/library/debian:bookworm-slim"));
    let binary = std::fs::metadata(agent::binary()).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    let (mut process, mut container) = (Vec::new(), Vec::new());
    for _ in 0..starts {
        for (times, command) in [
            (&mut process, fakes.agent(free_port(), free_port()).as_process()),
            (&mut container, fakes.agent(free_port(), free_port()).as_container(tag)),
        ] {
            let mut agent = command.spawn();
            times.push(agent.wait_ready().await);
            agent.terminate().await;
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        ms(times[times.len() / 2])
    };
    let (process, container) = (median(&mut process), median(&mut container));
    println!(
        "\nimage: {total:.1} MB ({base:.1} MB debian:bookworm-slim stand-in, {:.1} MB iptables, nftables, conntrack and CA certificates, {binary:.1} MB iamlet)",
        total - base - binary
    );
    println!(
        "cold start to ready ({NODE_PODS} pods, {starts} starts each, alternated): container (podman run) median {container:.0} ms, process {process:.0} ms, ratio {:.1}",
        container / process
    );
    json!({"measured": true, "size_mb": total, "base_mb": base, "binary_mb": binary,
           "ready_container_median_ms": container, "ready_process_median_ms": process,
           "container_to_process": container / process})
}

/// A very busy node of 5,000 pods beside the full node's figures (RSS, anonymous, ready).
async fn scale(full_node: (f64, f64, Duration)) -> Value {
    let (rss_110, anon_110, ready_110) = full_node;
    let fakes = Fakes::start().await;
    let (big, ready, prefetch) = fakes.start_node(BIG_NODE_PODS).await;
    let (rss, anon) = big.rss_mib();
    println!(
        "{BIG_NODE_PODS} pods: ready in {:.0} ms; all credentials prefetched {:.1} s later ({} STS calls); RSS {rss:.1} MiB ({anon:.1} MiB anonymous)",
        ms(ready),
        prefetch.as_secs_f64(),
        fakes.sts.assume_role_calls().len()
    );
    json!({"rss_110_pods_mib": rss_110, "rss_5000_pods_mib": rss,
           "anon_110_pods_mib": anon_110, "anon_5000_pods_mib": anon,
           "ready_110_pods_ms": ms(ready_110), "ready_5000_pods_ms": ms(ready),
           "prefetch_5000_pods_s": prefetch.as_secs_f64()})
}

/// The pod port binding's cost and speed, as root in network namespaces (skipped otherwise):
/// a node with pods on `cni0`, the agent with `--iptables`; a pod's credential requests
/// through 169.254.169.254 (the DNAT, and the binding's sets in the bridge's path), binding off
/// then on; then the time from a CNI record's write to its element in the kernel's set (seen
/// by `nft monitor`), for 110 pods one after another.
async fn binding(d: &Durations) -> Value {
    if !nix::unistd::Uid::effective().is_root() {
        println!("\npod port binding: skipped (needs root and network namespaces)");
        return json!({"skipped": "not root"});
    }
    let mut e2e = E2e::new("bench");
    let pod = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some(ROLE));
    let metadata: SocketAddr = "169.254.169.254:80".parse().unwrap();
    println!(
        "\n| {:<44} | {:>9} | {:>7} | {:>7} | {:>7} | {:>6} | {:>5} |",
        "pod port binding, from a pod on cni0", "req/s", "p50 ms", "p99 ms", "p99.9ms", "errors", "/off"
    );
    let mut rows = serde_json::Map::new();
    for keepalive in [false, true] {
        let mut off: Option<LoadResult> = None;
        for setting in ["false", "true"] {
            let mut agent = e2e
                .start_agent(&["--host-interface=cni0", &format!("--bind-pod-ports={setting}"), "--log-level=warn"])
                .await;
            let load = Load {
                target: metadata,
                path: CREDS_PATH,
                sources: Arc::new(vec!["10.42.0.10".parse().unwrap()]),
                connections: 8,
                keepalive,
                imdsv2: false,
                rate: None,
                duration: d.load,
            };
            let result = e2e.pod_ns(pod).run(move || run_load(load)).await;
            let name = format!(
                "binding {}, {}",
                if setting == "true" { "on" } else { "off" },
                if keepalive { "keep-alive" } else { "new connection per request" }
            );
            println!("{}", row(&name, &result, off.as_ref()));
            rows.insert(name, result.json());
            if setting == "false" {
                off = Some(result);
            }
            agent.signal(nix::sys::signal::Signal::SIGTERM);
            agent.exit(Duration::from_secs(20)).await;
        }
    }

    // The time from a pod's record to its binding, the node filling up to 110 pods.
    let agent = e2e.start_agent(&["--host-interface=cni0", "--bind-pod-ports=true", "--log-level=warn"]).await;
    let mut monitor = Command::new("ip")
        .args(["netns", "exec", &e2e.node().name, "nft", "monitor", "new", "elements"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nft monitor");
    let (lines_tx, lines) = std::sync::mpsc::channel::<(Instant, String)>();
    let stdout = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    // `nft monitor` has subscribed once it reports an element of a probe table's.
    let node = e2e.node();
    node.ok("nft", &["add table bridge iamlet_bench_probe { set probe { type ipv4_addr; }; }"]);
    let mut probe = 0u8;
    'subscribed: loop {
        probe = probe.wrapping_add(1);
        node.ok("nft", &["add", "element", "bridge", "iamlet_bench_probe", "probe", &format!("{{ 192.0.2.{probe} }}")]);
        while let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(100)) {
            if line.contains("iamlet_bench_probe") {
                break 'subscribed;
            }
        }
    }
    node.ok("nft", &["delete", "table", "bridge", "iamlet_bench_probe"]);
    let mut bound = histogram();
    for i in 0..NODE_PODS {
        let ip = format!("10.42.1.{}", i + 2);
        let mac = format!("0a:58:0a:2a:01:{:02x}", i + 2);
        let uid = format!("bench-uid-{i}");
        let written = Instant::now();
        iamlet_testkit::netns::CniRecord {
            container: format!("{:064x}", 0xbe9c4_u128 + i as u128),
            bridge: Some("0a:58:0a:2a:00:01".into()),
            host: (format!("bveth{i}"), "0a:58:00:00:00:01".into()),
            pod_mac: mac,
            sandbox: format!("/var/run/netns/bench-{i}"),
            ips: &[&ip],
            pod: ("bench", &format!("bound-{i}"), &uid),
        }
        .write(e2e.topology.cni_results.path());
        let needle = (format!(". {ip} "), format!(". {ip},"));
        loop {
            let (at, line) = lines.recv_timeout(Duration::from_secs(10)).expect("the element within 10 s");
            if line.contains("bound4") && (line.contains(&needle.0) || line.contains(&needle.1)) {
                bound.saturating_record(at.saturating_duration_since(written).as_micros().max(1) as u64);
                break;
            }
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    drop(agent);
    let (median, p99, max) = (
        bound.value_at_quantile(0.5) as f64 / 1000.0,
        bound.value_at_quantile(0.99) as f64 / 1000.0,
        bound.max() as f64 / 1000.0,
    );
    println!(
        "a pod's CNI record to its binding in the kernel, 1 to {NODE_PODS} pods on the node: median {median:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
    rows.insert(
        "record_to_binding".into(),
        json!({"pods": NODE_PODS, "median_ms": median, "p99_ms": p99, "max_ms": max}),
    );
    Value::Object(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    json!({"cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)})
}
