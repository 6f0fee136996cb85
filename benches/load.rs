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
//!    at once and settled, against the settled baseline (what stays above it is the leak signal).
//!
//! It prints a table and writes target/bench/load.json. `--quick` shortens every phase;
//! `--churn-only` runs a 110-pod node through the churn phase alone.

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
#[path = "../tests/support/env.rs"]
mod env;
#[path = "../tests/support/imds.rs"]
mod imds;
#[path = "../tests/support/moto.rs"]
mod moto;
#[path = "../tests/support/server.rs"]
mod server;
#[path = "../tests/support/sts_proxy.rs"]
mod sts_proxy;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpSocket;

const ROLE: &str = "bench-role";
const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/bench-role";

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The agent as its own process, so its memory is its own.
struct Agent {
    child: Child,
    app: SocketAddr,
    admin: SocketAddr,
    started: Instant,
}

impl Agent {
    fn spawn(api: &apiserver::FakeApiServer, sts: &sts_proxy::StsProxy, imds: &imds::FakeImds) -> Self {
        Self::spawn_on(api, sts, imds, free_port(), free_port())
    }

    /// On given ports: a successor takes its predecessor's (the DNAT target does not change).
    fn spawn_on(
        api: &apiserver::FakeApiServer,
        sts: &sts_proxy::StsProxy,
        imds: &imds::FakeImds,
        app_port: u16,
        admin_port: u16,
    ) -> Self {
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_iamlet"))
            .args(env::loopback_agent_args(&api.url, &imds.addr, app_port, admin_port))
            .arg("--log-level=warn")
            .env_clear()
            .envs(env::agent_env(&sts.url))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting iamlet");
        Self {
            child,
            app: SocketAddr::from(([127, 0, 0, 1], app_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            started,
        }
    }

    /// Waits for /readyz; returns the time from spawn.
    async fn ready(&self) -> Duration {
        loop {
            if let Ok((200, _)) = get(None, self.admin, "/readyz", &[]).await {
                return self.started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resident memory in MiB: all of it (VmRSS), and the anonymous part (RssAnon: the heap
    /// and stacks, what grows with pods; the rest is the binary's own mapped pages).
    fn rss_mib(&self) -> (f64, f64) {
        (status_mib(self.child.id(), "VmRSS:"), status_mib(self.child.id(), "RssAnon:"))
    }

    /// SIGTERM, then waits for the exit (the drain).
    fn terminate(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalling iamlet");
        let status = self.child.wait().expect("waiting for iamlet");
        assert!(status.success(), "iamlet exited {status} on SIGTERM");
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = get(None, self.admin, "/metrics", &[]).await.unwrap();
        body.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET on a fresh connection, from `from` if given.
async fn get(
    from: Option<IpAddr>,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let mut sender = connect(from, to).await?;
    let (status, body) = send(&mut sender, "GET", path, headers, false).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(from: Option<IpAddr>, to: SocketAddr) -> anyhow::Result<Sender> {
    let socket = TcpSocket::new_v4()?;
    if let Some(from) = from {
        socket.bind(SocketAddr::new(from, 0))?;
    }
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    close: bool,
) -> anyhow::Result<(u16, Bytes)> {
    let mut request = Request::builder().method(method).uri(path).header("host", "169.254.169.254");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if close {
        request = request.header("connection", "close");
    }
    sender.ready().await?;
    let response = sender.send_request(request.body(Empty::new())?).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
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

async fn run_load(load: Load) -> LoadResult {
    let start = Instant::now();
    let deadline = start + load.duration;
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..load.connections)
        .map(|c| {
            let load = load.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let source = load.sources[c % load.sources.len()];
                let mut token = String::new();
                let interval = load.rate.map(|r| Duration::from_secs_f64(load.connections as f64 / r as f64));
                let mut next =
                    start + interval.map(|i| i.mul_f64(c as f64 / load.connections as f64)).unwrap_or_default();
                let mut sender: Option<Sender> = None;
                while Instant::now() < deadline {
                    // Open loop: latency counts from the scheduled send time when the previous
                    // answer came late (coordinated omission), else from the actual send, so
                    // the timer's own lag (tokio's is up to 1 ms) is not charged to the server.
                    let scheduled = match interval {
                        Some(_) if Instant::now() > next => next,
                        Some(_) => {
                            tokio::time::sleep_until(next.into()).await;
                            Instant::now()
                        }
                        None => Instant::now(),
                    };
                    let outcome: anyhow::Result<u16> = async {
                        if sender.is_none() {
                            let mut fresh = connect(Some(source), load.target).await?;
                            if load.imdsv2 && token.is_empty() {
                                let (_, body) = send(
                                    &mut fresh,
                                    "PUT",
                                    "/latest/api/token",
                                    &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
                                    false,
                                )
                                .await?;
                                token = String::from_utf8_lossy(&body).into_owned();
                            }
                            sender = Some(fresh);
                        }
                        let headers: Vec<(&str, &str)> =
                            if load.imdsv2 { vec![("x-aws-ec2-metadata-token", token.as_str())] } else { vec![] };
                        let (status, _) =
                            send(sender.as_mut().unwrap(), "GET", load.path, &headers, !load.keepalive).await?;
                        Ok(status)
                    }
                    .await;
                    match outcome {
                        Ok(200) => {
                            histogram.saturating_record(scheduled.elapsed().as_micros().max(1) as u64);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            sender = None;
                        }
                    }
                    if !load.keepalive {
                        sender = None;
                    }
                    if let Some(step) = interval {
                        next += step;
                    }
                }
                histogram
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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

/// A `/proc/<pid>/status` memory line, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn create_pods(api: &apiserver::FakeApiServer, range: std::ops::Range<usize>) {
    for i in range {
        api.create_pod(apiserver::pod("bench", &format!("pod-{i}")).ip(&pod_ip(i).to_string()).role(ROLE).build());
    }
}

/// An agent on a node with `pods` pods, each with the role; returns it with its time to
/// ready and the time from ready until every pod's credentials were fetched.
async fn start_node(
    api: &apiserver::FakeApiServer,
    sts: &sts_proxy::StsProxy,
    imds: &imds::FakeImds,
    pods: usize,
) -> (Agent, Duration, Duration) {
    create_pods(api, 0..pods);
    let agent = Agent::spawn(api, sts, imds);
    let ready = agent.ready().await;
    let prefetch = wait_prefetched(&agent, pods).await;
    (agent, ready, prefetch)
}

/// Waits until every pod is indexed and its credentials fetched; fails after a minute.
async fn wait_prefetched(agent: &Agent, pods: usize) -> Duration {
    let started = Instant::now();
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    while agent.metric(fetched).await < pods as f64 || agent.metric("iamlet_pods_indexed").await < pods as f64 {
        assert!(started.elapsed() < Duration::from_secs(60), "prefetch incomplete after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
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
    runtime.block_on(bench(durations));
}

/// `--churn-only`: a node of 110 pods, then the churn phase alone (looking for a leak).
async fn churn_only() {
    let api = apiserver::FakeApiServer::start().await;
    let sts = sts_proxy::StsProxy::start().await;
    let imds = imds::FakeImds::start().await;
    let (agent, _, _) = start_node(&api, &sts, &imds, 110).await;
    println!("{}", serde_json::to_string_pretty(&churn(&api, &agent).await).unwrap());
}

async fn bench(d: Durations) {
    let mut report = json!({"machine": machine(), "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()});
    let api = apiserver::FakeApiServer::start().await;
    let sts = sts_proxy::StsProxy::start().await;
    let imds = imds::FakeImds::start().await;

    // A full node: 110 pods, each with the role.
    const NODE_PODS: usize = 110;
    let (agent, ready, prefetch) = start_node(&api, &sts, &imds, NODE_PODS).await;
    let (rss_110, anon_110) = agent.rss_mib();
    println!(
        "iamlet ready in {:.0} ms with {NODE_PODS} pods; credentials prefetched {:.0} ms later; RSS {rss_110:.1} MiB ({anon_110:.1} MiB anonymous)",
        ms(ready),
        ms(prefetch)
    );

    let (_, body) = get(Some(pod_ip(0)), agent.app, CREDS_PATH, &[]).await.unwrap();
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
    println!(
        "|{}|{}|{}|{}|{}|{}|{}|",
        "-".repeat(46),
        "-".repeat(11),
        "-".repeat(9),
        "-".repeat(9),
        "-".repeat(9),
        "-".repeat(8),
        "-".repeat(7)
    );
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
    report["load"] = Value::Object(loads);

    // Cold start: a pod is created and asks at once; the agent waits for the watch, prefetch
    // and STS (moto) run concurrently with the wait.
    let mut cold = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut cold_errors = 0;
    for i in 0..d.cold_pods {
        let index = 50_000 + i;
        let started = Instant::now();
        api.create_pod(apiserver::pod("bench", &format!("cold-{i}")).ip(&pod_ip(index).to_string()).role(ROLE).build());
        match get(Some(pod_ip(index)), agent.app, CREDS_PATH, &[]).await {
            Ok((200, _)) => cold.saturating_record(started.elapsed().as_micros() as u64),
            _ => cold_errors += 1,
        }
    }
    println!(
        "\ncold start, pod creation to credentials ({} pods): median {:.1} ms, p99 {:.1} ms, errors {cold_errors}",
        d.cold_pods,
        cold.value_at_quantile(0.5) as f64 / 1000.0,
        cold.value_at_quantile(0.99) as f64 / 1000.0
    );
    report["cold_start"] = json!({"pods": d.cold_pods, "median_ms": cold.value_at_quantile(0.5) as f64 / 1000.0,
                                  "p99_ms": cold.value_at_quantile(0.99) as f64 / 1000.0, "errors": cold_errors});

    // Sustained load, RSS sampled: growth after warm-up is the leak signal.
    let soak = base(agent.app, CREDS_PATH, true, true, Some(2_000));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = running.clone();
        let pid = agent.child.id();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while running.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
                samples.push(rss.unwrap_or(0.0) / 1024.0);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            samples
        })
    };
    let soak_result = run_load(Load { duration: d.soak, ..soak }).await;
    running.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let warm = samples.get(samples.len() / 5).copied().unwrap_or(0.0);
    let last = samples.last().copied().unwrap_or(0.0);
    println!(
        "sustained load, {:.0} s at 2,000 req/s IMDSv2: {} requests, {} errors; RSS {warm:.1} MiB after warm-up -> {last:.1} MiB at the end",
        d.soak.as_secs_f64(),
        soak_result.requests,
        soak_result.errors
    );
    report["soak"] = json!({"seconds": d.soak.as_secs(), "requests": soak_result.requests, "errors": soak_result.errors,
                            "rss_warm_mib": warm, "rss_end_mib": last, "p99_ms": soak_result.percentile_ms(0.99)});

    let keys = NODE_PODS + d.cold_pods;
    let calls = sts.assume_role_calls().len();
    println!(
        "STS AssumeRole calls: {calls} for {keys} distinct (role, pod) keys, over {} requests",
        soak_result.requests
    );
    report["sts"] = json!({"calls": calls, "distinct_keys": keys});

    let hostile = exhaustion(&agent).await;
    println!(
        "exhaustion ({} slow-header connections, {} unknown-IP requests in flight, one pod opening {} connections): \
         a known pod's p50 / p99 {:.2} / {:.2} ms, {} errors; {} connections refused; RSS {:.1} MiB",
        hostile["slow_connections"],
        hostile["flood_in_flight"],
        hostile["greedy_attempts"],
        hostile["known_p50_ms"].as_f64().unwrap_or_default(),
        hostile["known_p99_ms"].as_f64().unwrap_or_default(),
        hostile["known_errors"],
        hostile["refused"],
        hostile["rss_mib"].as_f64().unwrap_or_default()
    );
    report["exhaustion"] = hostile;

    let churn = churn(&api, &agent).await;
    let mib = |key: &str| -> Vec<String> {
        let pairs: Vec<(f64, f64)> = serde_json::from_value(churn[key].clone()).unwrap_or_default();
        pairs.iter().map(|(rss, anon)| format!("{rss:.1} ({anon:.1})")).collect()
    };
    let baseline: (f64, f64) = serde_json::from_value(churn["baseline_mib"].clone()).unwrap_or_default();
    println!(
        "churn, 3 cycles of 1,000 pods created and deleted: RSS (anonymous) MiB: baseline {:.1} ({:.1}); \
         after each cycle at once {}; settled {}",
        baseline.0,
        baseline.1,
        mib("at_once_mib").join(", "),
        mib("settled_mib").join(", ")
    );
    report["churn"] = churn;

    let gaps = restart_gap(&api, &sts, &imds, agent, NODE_PODS, d.restarts).await;
    let median = gaps[gaps.len() / 2];
    println!(
        "restart gap, successor's start to a pod's first credentials ({NODE_PODS} pods, {} restarts): median {:.0} ms, max {:.0} ms",
        gaps.len(),
        ms(median),
        ms(*gaps.last().unwrap())
    );
    report["restart_gap"] = json!({"pods": NODE_PODS, "restarts": gaps.len(), "median_ms": ms(median),
                                   "max_ms": ms(*gaps.last().unwrap()), "all_ms": gaps.iter().map(|g| ms(*g)).collect::<Vec<_>>()});

    // A very busy node: 5,000 pods.
    const BIG: usize = 5_000;
    let big_api = apiserver::FakeApiServer::start().await;
    let big_sts = sts_proxy::StsProxy::start().await;
    let (big, big_ready, big_prefetch) = start_node(&big_api, &big_sts, &imds, BIG).await;
    let (rss_5000, anon_5000) = big.rss_mib();
    println!(
        "{BIG} pods: ready in {:.0} ms; all credentials prefetched {:.1} s later ({} STS calls); RSS {rss_5000:.1} MiB ({anon_5000:.1} MiB anonymous)",
        ms(big_ready),
        big_prefetch.as_secs_f64(),
        big_sts.assume_role_calls().len()
    );
    report["scale"] = json!({"rss_110_pods_mib": rss_110, "rss_5000_pods_mib": rss_5000,
                             "anon_110_pods_mib": anon_110, "anon_5000_pods_mib": anon_5000,
                             "ready_110_pods_ms": ms(ready), "ready_5000_pods_ms": ms(big_ready),
                             "prefetch_5000_pods_s": big_prefetch.as_secs_f64()});

    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/load.json", serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwritten: target/bench/load.json");
}

/// Hostile load against the agent's default limits, while the pod at `pod_ip(0)` asks for its
/// credentials on a new connection each time: 1,000 connections trickling their headers from
/// 250 unknown IPs, 200 requests at a time from unknown IPs (each held for the watch wait), and
/// one IP opening 200 connections (64 are allowed).
async fn exhaustion(agent: &Agent) -> Value {
    const SLOW: usize = 1000;
    const FLOOD: usize = 200;
    const GREEDY: usize = 200;
    let unknown = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 200, (i / 250) as u8, (i % 250 + 2) as u8));
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(unknown(i / 4), 0)).unwrap();
        if let Ok(mut stream) = socket.connect(agent.app).await {
            use tokio::io::AsyncWriteExt as _;
            let _ = stream.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254").await;
            slow.push(stream);
        }
    }
    let mut greedy = Vec::new();
    for _ in 0..GREEDY {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 201, 0, 2)), 0)).unwrap();
        if let Ok(stream) = socket.connect(agent.app).await {
            greedy.push(stream);
        }
    }
    let running = Arc::new(AtomicBool::new(true));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (running, app) = (running.clone(), agent.app);
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    let _ = get(Some(unknown(300 + i)), app, CREDS_PATH, &[]).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // the flood's first requests are waiting
    let mut known = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut errors = 0;
    for _ in 0..500 {
        let started = Instant::now();
        match get(Some(pod_ip(0)), agent.app, CREDS_PATH, &[]).await {
            Ok((200, _)) => known.saturating_record(started.elapsed().as_micros() as u64),
            _ => errors += 1,
        }
    }
    let (rss, _) = agent.rss_mib();
    running.store(false, Ordering::Relaxed);
    for task in flood {
        let _ = task.await;
    }
    let refused = agent.metric("iamlet_connections_refused_total{reason=\"per-ip\"}").await
        + agent.metric("iamlet_connections_refused_total{reason=\"total\"}").await;
    drop((slow, greedy));
    json!({"slow_connections": SLOW, "flood_in_flight": FLOOD, "greedy_attempts": GREEDY,
           "known_p50_ms": known.value_at_quantile(0.5) as f64 / 1000.0,
           "known_p99_ms": known.value_at_quantile(0.99) as f64 / 1000.0,
           "known_errors": errors, "refused": refused, "rss_mib": rss})
}

/// Memory over pod churn: three cycles in which 1,000 pods appear (their credentials are
/// prefetched) and are deleted, back to the pods the node had. RSS (all, anonymous) settled
/// before the first cycle, then after each: at once, and settled. Settled figures above the
/// baseline are the leak signal.
async fn churn(api: &apiserver::FakeApiServer, agent: &Agent) -> Value {
    const PODS: usize = 1000;
    const CYCLES: usize = 3;
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    let base = agent.metric("iamlet_pods_indexed").await;
    let baseline = settled_rss(agent).await;
    let (mut at_once, mut settled) = (Vec::new(), Vec::new());
    for cycle in 0..CYCLES {
        let before = agent.metric(fetched).await;
        let names: Vec<String> = (0..PODS).map(|i| format!("churn-{cycle}-{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            let ip = pod_ip(20_000 + cycle * PODS + i).to_string();
            api.create_pod(apiserver::pod("bench", name).ip(&ip).role(ROLE).build());
        }
        let started = Instant::now();
        while agent.metric(fetched).await < before + PODS as f64 {
            assert!(started.elapsed() < Duration::from_secs(120), "churn prefetch incomplete");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for name in &names {
            api.delete_pod("bench", name);
        }
        while agent.metric("iamlet_pods_indexed").await > base {
            assert!(started.elapsed() < Duration::from_secs(180), "churn deletions not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        at_once.push(agent.rss_mib());
        settled.push(settled_rss(agent).await);
    }
    json!({"pods_per_cycle": PODS, "baseline_mib": baseline, "at_once_mib": at_once, "settled_mib": settled})
}

/// RSS (all, anonymous) that stays: read 30 s after a burst, since the allocator hands freed
/// pages back to the kernel over about 10 s (jemalloc's decay).
async fn settled_rss(agent: &Agent) -> (f64, f64) {
    tokio::time::sleep(Duration::from_secs(30)).await;
    agent.rss_mib()
}

/// Replaces `agent` `restarts` times, as a rolling update does: SIGTERM, then a successor on
/// the same ports. Each gap runs from the successor's process start until a pod (a
/// different one each time, asking as soon as anything answers) gets its credentials: while
/// iamlet's rules are kept across the restart, that is how long pods are refused. Sorted.
async fn restart_gap(
    api: &apiserver::FakeApiServer,
    sts: &sts_proxy::StsProxy,
    imds: &imds::FakeImds,
    mut agent: Agent,
    pods: usize,
    restarts: usize,
) -> Vec<Duration> {
    let (app_port, admin_port) = (agent.app.port(), agent.admin.port());
    let mut gaps = Vec::new();
    for restart in 0..restarts {
        agent.terminate();
        agent = Agent::spawn_on(api, sts, imds, app_port, admin_port);
        let pod = pod_ip(restart % pods);
        loop {
            if let Ok((200, _)) = get(Some(pod), agent.app, CREDS_PATH, &[]).await {
                break;
            }
            assert!(agent.started.elapsed() < Duration::from_secs(30), "no credentials 30 s after a restart");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gaps.push(agent.started.elapsed());
    }
    gaps.sort();
    gaps
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
