//! A fleet of simulated nodes on tokio's paused clock, each running iamlet's own credential
//! code (the `CredentialCache` with its queue, budget, retries and backoff, the prefetcher, the
//! refresh scan, the hand-over's adoption), against one simulated STS: an account-wide token
//! bucket answering `Throttling` as STS does. Hours pass in seconds; what is measured is what
//! the account's STS sees and what the pods see.
//!
//! What is modelled, not run: the Kubernetes side (each node's pods arrive as the pod watch
//! would report them), the metadata API's HTTP (a pod's request is the cache call the
//! metadata service makes, bounded by the 1 s an SDK gives it), and a restart's process gap
//! (the benchmark measures that). Run it with `cargo run --release --example fleet`.
//!
//! The workload: the fleet's nodes are split into node pools, each running the pods of its
//! own few roles (as large fleets are run: a pool per team or workload), plus the pods of a
//! few DaemonSets with roles on every node. Each role has its ServiceAccounts. A pod's SDK
//! asks for credentials when it starts, then when what it holds has 5 to 15 minutes left (the
//! SDKs' refresh windows), and after a failure, again after a jittered backoff (1 s doubling to 20 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use iamlet::clock::Clock;
use iamlet::cluster::Change;
use iamlet::credentials::{
    BudgetSettings, CredentialCache, Credentials, Issued, Liveness, RoleAssumer, StsError, StsSettings, refresh_point,
};
use iamlet::handover::wire::Entry;
use iamlet::metrics::{Metrics, StsLabels};
use iamlet::pod::PodIdentity;
use iamlet::policy::{BaseArn, Policy};
use iamlet::resolve::{CredentialKey, Resolver, SessionOptions, SessionRules, SessionScope};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Roles in the cluster.
    pub roles: usize,
    /// Roles each node pool runs (its pods are spread over them).
    pub roles_per_pool: usize,
    /// Roles of DaemonSets: one pod of each on every node.
    pub daemonset_roles: usize,
    pub service_accounts_per_role: usize,
    /// `--session-scope`.
    pub scope: SessionScope,
    /// The account's STS: calls per second, and the bucket's burst.
    pub sts_rps: f64,
    pub sts_burst: f64,
    /// How long STS takes to answer.
    pub sts_latency: Duration,
    /// `--sts-max-rps` and `--sts-burst` of every node.
    pub node_budget: BudgetSettings,
    /// Simulated time.
    pub duration: Duration,
    /// Share of a node's pods replaced per hour (Deployments rolling, pods rescheduled).
    pub churn_per_hour: f64,
    /// A rolling update of every agent, with hand-over, starting then and lasting that long.
    pub rollout: Option<(Duration, Duration)>,
    /// Every agent crashing at once, then (restarted with nothing cached).
    pub crash_at: Option<Duration>,
    /// An hour of job bursts from then: every `burst_every`, each node starts
    /// `burst_jobs` job pods over `burst_spread` (the scheduler's pace), each running
    /// `job_runs`.
    pub bursts_at: Option<Duration>,
    pub burst_jobs: usize,
    pub burst_every: Duration,
    pub burst_spread: Duration,
    pub job_runs: Duration,
    /// How long an SDK waits for the metadata service.
    pub pod_timeout: Duration,
    pub seed: u64,
    /// Says on stderr how far the simulation is, every 10 simulated minutes.
    pub progress: bool,
}

impl FleetConfig {
    /// The fleet: 5,000 nodes of 110 pods, 200 roles, 600 AssumeRole/s, 4 hours
    /// with a rollout, a crash of every agent and an hour of job bursts.
    pub fn full(scope: SessionScope) -> Self {
        Self {
            nodes: 5000,
            pods_per_node: 110,
            roles: 200,
            roles_per_pool: 8,
            daemonset_roles: 2,
            service_accounts_per_role: 1,
            scope,
            sts_rps: 600.0,
            sts_burst: 600.0,
            sts_latency: Duration::from_millis(40),
            node_budget: BudgetSettings { rate: 10.0, burst: 20.0 },
            duration: Duration::from_secs(4 * 3600),
            churn_per_hour: 0.1,
            rollout: Some((Duration::from_secs(40 * 60), Duration::from_secs(30 * 60))),
            crash_at: Some(Duration::from_secs(100 * 60)),
            bursts_at: Some(Duration::from_secs(150 * 60)),
            burst_jobs: 10,
            burst_every: Duration::from_secs(15 * 60),
            burst_spread: Duration::from_secs(5 * 60),
            job_runs: Duration::from_secs(4 * 60),
            pod_timeout: Duration::from_secs(1),
            seed: 1,
            progress: false,
        }
    }

    /// The same events on a fleet of `nodes` for `duration`, the events' times scaled to it.
    pub fn scaled(scope: SessionScope, nodes: usize, duration: Duration) -> Self {
        let full = Self::full(scope);
        let scale = |at: Duration| at.mul_f64(duration.as_secs_f64() / full.duration.as_secs_f64());
        let sts_rps = full.sts_rps * nodes as f64 / full.nodes as f64;
        Self {
            nodes,
            duration,
            sts_rps,
            sts_burst: sts_rps,
            rollout: full.rollout.map(|(at, over)| (scale(at), scale(over))),
            crash_at: full.crash_at.map(scale),
            bursts_at: full.bursts_at.map(scale),
            ..full
        }
    }
}

/// Median, 99th percentile and most of a per-second series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(series: &[u32]) -> Self {
        let mut sorted = series.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0);
        Self { median: f64::from(at(0.5)), p99: f64::from(at(0.99)), max: f64::from(at(1.0)) }
    }
}

/// One phase of the simulation (steady, rollout, crash, bursts).
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub assume_role_per_s: Spread,
    /// AssumeRole calls STS received in the phase.
    pub calls: u64,
    pub throttled: u64,
    pub pod_visible_failures: u64,
}

/// What the fleet's STS and pods saw.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub nodes: usize,
    pub pods: usize,
    pub scope: SessionScope,
    /// AssumeRole calls STS received per simulated second, throttled ones included.
    pub assume_role_per_s: Spread,
    pub assume_role_calls: u64,
    pub throttled: u64,
    /// Requests not answered with credentials within the SDK's timeout.
    pub pod_visible_failures: u64,
    pub requests: u64,
    /// Credentials handed to pods with less than 15 minutes left
    /// (`iamlet_credentials_served_late_total`).
    pub late_credentials: u64,
    /// Each phase: its name, its calls per second, its throttled calls and its pod-visible
    /// failures.
    pub phases: Vec<Phase>,
}

impl FleetReport {
    /// The report as one JSON object (the example's last line).
    pub fn json(&self) -> serde_json::Value {
        let spread = |s: &Spread| serde_json::json!({"median": s.median, "p99": s.p99, "max": s.max});
        serde_json::json!({
            "nodes": self.nodes,
            "pods": self.pods,
            "scope": self.scope.as_str(),
            "assume_role_per_s": spread(&self.assume_role_per_s),
            "assume_role_calls": self.assume_role_calls,
            "throttled": self.throttled,
            "pod_visible_failures": self.pod_visible_failures,
            "requests": self.requests,
            "late_credentials": self.late_credentials,
            "phases": self.phases.iter().map(|phase| (phase.name.to_string(), serde_json::json!({
                "assume_role_per_s": spread(&phase.assume_role_per_s),
                "calls": phase.calls,
                "throttled": phase.throttled,
                "pod_visible_failures": phase.pod_visible_failures,
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// The account's STS: a token bucket shared by every node, answering `Throttling` when empty.
struct SimSts {
    clock: Clock,
    latency: Duration,
    started: Instant,
    bucket: Mutex<(f64, Instant)>,
    rate: f64,
    burst: f64,
    /// Calls received in each simulated second.
    per_second: Mutex<Vec<u32>>,
    calls: AtomicU64,
    throttled: AtomicU64,
    throttled_at: Mutex<Vec<u32>>,
}

impl SimSts {
    fn admit(&self, now: Instant) -> bool {
        let mut bucket = self.bucket.lock();
        let (tokens, at) = &mut *bucket;
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RoleAssumer for SimSts {
    fn assume_role<'a>(
        &'a self,
        _: &'a CredentialKey,
        duration: Duration,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let now = Instant::now();
            let second = now.saturating_duration_since(self.started).as_secs() as usize;
            {
                let mut per_second = self.per_second.lock();
                if per_second.len() <= second {
                    per_second.resize(second + 1, 0);
                }
                per_second[second] += 1;
            }
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let admitted = self.admit(now);
            tokio::time::sleep(self.latency).await;
            if !admitted {
                self.throttled.fetch_add(1, Ordering::Relaxed);
                self.throttled_at.lock().push(second as u32);
                return Err(StsError::answered(Some("Throttling".into()), "Rate exceeded", Some(400)));
            }
            Ok(Credentials {
                access_key_id: format!("ASIA{n:016}"),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: self.clock.now() + duration,
            })
        })
    }
}

/// What every node shares.
struct Shared {
    config: FleetConfig,
    clock: Clock,
    sts: Arc<SimSts>,
    metrics: Arc<Metrics>,
    settings: StsSettings,
    policy: Arc<Policy>,
    requests: AtomicU64,
    failures: AtomicU64,
    /// When each failure happened (simulated seconds).
    failed_at: Mutex<Vec<u32>>,
    started: Instant,
}

/// One agent on a node: its cache and resolver, and the tasks keeping the cache ahead.
struct Agent {
    cache: Arc<CredentialCache>,
    resolver: Arc<Resolver>,
    changes: mpsc::UnboundedSender<Change>,
    _tasks: JoinSet<()>,
}

impl Agent {
    /// An agent starting on `node` with `pods` listed, adopting `adopted` (a hand-over).
    async fn start(
        shared: &Shared,
        node: &str,
        pods: &[Arc<PodIdentity>],
        adopted: Vec<(CredentialKey, Issued)>,
    ) -> Self {
        let liveness = Arc::new(Liveness::default());
        let assumer: Arc<dyn RoleAssumer> = shared.sts.clone();
        let cache = CredentialCache::with_clock(
            assumer,
            shared.settings.clone(),
            liveness,
            shared.metrics.clone(),
            shared.clock,
        );
        if !adopted.is_empty() {
            cache.adopt(adopted).await;
        }
        let resolver = Arc::new(resolver(shared, node));
        let (changes, changed) = mpsc::unbounded_channel();
        let (_synced, pods_synced) = watch::channel(true);
        let mut tasks = JoinSet::new();
        iamlet::credentials::keep_ahead(&cache, resolver.clone(), changed, pods_synced, None, &mut tasks);
        for pod in pods {
            let _ = changes.send(Change::Upserted(pod.clone()));
        }
        Self { cache, resolver, changes, _tasks: tasks }
    }

    /// What a successor adopts: every entry, through the hand-over's own wire format.
    fn hand_over(&self) -> Vec<(CredentialKey, Issued)> {
        let entries = self.cache.handover_entries();
        self.cache.retire();
        entries.iter().filter_map(|(key, issued)| Entry::new(key, issued).into_parts()).collect()
    }
}

/// A node: its pods and its current agent (swapped by a rollout or a crash).
struct Node {
    name: String,
    pool: usize,
    agent: Mutex<Arc<Agent>>,
    pods: Mutex<HashMap<String, (Arc<PodIdentity>, tokio::task::AbortHandle)>>,
    next_pod: AtomicU64,
}

impl Node {
    fn agent(&self) -> Arc<Agent> {
        self.agent.lock().clone()
    }

    fn listing(&self) -> Vec<Arc<PodIdentity>> {
        self.pods.lock().values().map(|(pod, _)| pod.clone()).collect()
    }
}

/// The pod `ordinal` of a node in `pool`: a DaemonSet's (the first ones) or one of the
/// pool's workloads, with a role and a ServiceAccount.
fn pod_of(
    config: &FleetConfig,
    (node, pool, next_pod): (&str, usize, &AtomicU64),
    rng: &mut fastrand::Rng,
    daemonset: Option<usize>,
    job: bool,
) -> PodIdentity {
    let n = next_pod.fetch_add(1, Ordering::Relaxed);
    let (role, namespace) = match daemonset {
        Some(d) => (d, "kube-system".to_string()),
        None => {
            let pooled = config.roles.saturating_sub(config.daemonset_roles).max(1);
            let first = config.daemonset_roles + (pool * config.roles_per_pool) % pooled;
            let role = first + rng.usize(..config.roles_per_pool.max(1));
            (role.min(config.roles - 1), format!("team-{pool}"))
        }
    };
    let service_account = format!("sa-{role}-{}", rng.usize(..config.service_accounts_per_role.max(1)));
    let kind = if job { "job" } else { "app" };
    PodIdentity {
        namespace,
        name: format!("{kind}-{role}-{n}"),
        uid: format!("{node}-{n}"),
        service_account,
        role_annotation: Some(format!("role-{role}")),
        running: true,
        ..PodIdentity::default()
    }
}

/// A pod's SDK: asks at `first_ask`, then whenever what it holds has 5 to 15 minutes left;
/// after a failure, again after a backoff (full jitter, 1 s doubling to 20 s, as the AWS SDKs'
/// standard retry mode).
async fn sdk(shared: Arc<Shared>, node: Arc<Node>, pod: Arc<PodIdentity>, first_ask: Instant, mut rng: fastrand::Rng) {
    let mut next = first_ask;
    let mut failed = 0;
    loop {
        tokio::time::sleep_until(next).await;
        let agent = node.agent();
        let Ok(resolved) = agent.resolver.resolve(&pod) else { return };
        let started = Instant::now();
        let timeout = shared.config.pod_timeout;
        let answer = tokio::time::timeout(timeout, agent.cache.get_until(&resolved.key, started + timeout)).await;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        next = match answer {
            Ok(Ok(issued)) => {
                failed = 0;
                let left = issued.remaining(shared.clock.now());
                let window = Duration::from_secs(5 * 60 + rng.u64(..600));
                Instant::now() + left.saturating_sub(window).max(Duration::from_secs(60))
            }
            _ => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                shared.failed_at.lock().push(started.saturating_duration_since(shared.started).as_secs() as u32);
                failed += 1;
                let ceiling = Duration::from_secs(1 << failed.min(5)).min(Duration::from_secs(20));
                Instant::now() + Duration::from_millis(100) + ceiling.mul_f64(rng.f64())
            }
        };
    }
}

/// Puts `pod` on `node`: the watch reports it, and its SDK starts asking `first_ask` later.
fn add_pod(shared: &Arc<Shared>, node: &Arc<Node>, pod: PodIdentity, first_ask: Duration, rng: &mut fastrand::Rng) {
    let pod = Arc::new(pod);
    let _ = node.agent().changes.send(Change::Upserted(pod.clone()));
    let sdk = tokio::spawn(sdk(shared.clone(), node.clone(), pod.clone(), Instant::now() + first_ask, rng.fork()));
    node.pods.lock().insert(pod.uid.clone(), (pod, sdk.abort_handle()));
}

fn remove_pod(node: &Node, uid: &str) {
    if let Some((pod, sdk)) = node.pods.lock().remove(uid) {
        sdk.abort();
        let _ = node.agent().changes.send(Change::Removed(pod));
    }
}

/// The resolver of the agents on `node`.
fn resolver(shared: &Shared, node: &str) -> Resolver {
    let sessions = SessionOptions { scope: shared.config.scope, tagging: None, source_identity: false };
    Resolver::configured(shared.policy.clone(), sessions, node, None, None)
}

/// Credentials as a node that has run for a while holds them: fetched up to 22.5 minutes ago,
/// due for refresh as iamlet schedules it.
fn warm(
    shared: &Shared,
    node: &str,
    pods: &[Arc<PodIdentity>],
    rng: &mut fastrand::Rng,
) -> Vec<(CredentialKey, Issued)> {
    let rules: SessionRules = shared.settings.iam_role_session_ttl;
    let resolver = resolver(shared, node);
    let mut keys: HashMap<CredentialKey, Issued> = HashMap::new();
    for pod in pods {
        let Ok(resolved) = resolver.resolve(pod) else { continue };
        keys.entry(resolved.key).or_insert_with(|| {
            let obtained = shared.clock.now() - Duration::from_secs(rng.u64(..1350));
            let expiration = obtained + rules.duration();
            let credentials = Credentials {
                access_key_id: format!("ASIAWARM{:012}", rng.u64(..1_000_000_000_000)),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration,
            };
            let refresh_at = refresh_point(expiration, rules.refresh_before(), rng.f64());
            Issued::new(credentials, obtained).refreshed_at(refresh_at)
        });
    }
    keys.into_iter().collect()
}

/// Runs the simulation. Call it on a current-thread runtime with time paused
/// (`#[tokio::test(start_paused = true)]`, or `tokio::time::pause()` first).
pub async fn simulate(config: FleetConfig) -> FleetReport {
    let clock = Clock::following_tokio();
    let started = Instant::now();
    let sts = Arc::new(SimSts {
        clock,
        latency: config.sts_latency,
        started,
        bucket: Mutex::new((config.sts_burst, started)),
        rate: config.sts_rps,
        burst: config.sts_burst,
        per_second: Mutex::new(Vec::new()),
        calls: AtomicU64::new(0),
        throttled: AtomicU64::new(0),
        throttled_at: Mutex::new(Vec::new()),
    });
    let settings = StsSettings {
        iam_role_session_ttl: SessionRules::new(Duration::from_secs(1800)),
        iam_role_error_ttl: Duration::from_secs(5),
        sts_timeout: Duration::from_secs(5),
        sts_concurrency: 16,
        sts_budget: config.node_budget,
        use_regional_sts_endpoint: false,
        sessions: SessionOptions { scope: config.scope, tagging: None, source_identity: false },
        assume_role_arn: None,
    };
    let policy = Policy {
        base: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").expect("a base ARN")),
        default_role: None,
        restrictions: None,
        account: None,
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        clock,
        sts: sts.clone(),
        metrics: Arc::new(Metrics::new()),
        settings,
        policy: Arc::new(policy),
        requests: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        failed_at: Mutex::new(Vec::new()),
        started,
    });
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let pools = (config.roles.saturating_sub(config.daemonset_roles) / config.roles_per_pool.max(1)).max(1);

    // A fleet that has been running: every node's agent with its pods' credentials cached,
    // every SDK holding credentials it will renew in its refresh window.
    let mut nodes = Vec::with_capacity(config.nodes);
    for index in 0..config.nodes {
        let name = format!("node-{index}");
        let (pool, next_pod) = (index % pools, AtomicU64::new(0));
        let mut pods = Vec::with_capacity(config.pods_per_node);
        for ordinal in 0..config.pods_per_node {
            let daemonset = (ordinal < config.daemonset_roles).then_some(ordinal);
            pods.push(Arc::new(pod_of(&config, (&name, pool, &next_pod), &mut rng, daemonset, false)));
        }
        let adopted = warm(&shared, &name, &pods, &mut rng);
        let agent = Agent::start(&shared, &name, &pods, adopted).await;
        let node = Arc::new(Node {
            name,
            pool,
            agent: Mutex::new(Arc::new(agent)),
            pods: Mutex::new(HashMap::new()),
            next_pod,
        });
        for pod in pods {
            let held = Duration::from_secs(5 * 60 + rng.u64(..1800));
            let sdk = tokio::spawn(sdk(shared.clone(), node.clone(), pod.clone(), started + held, rng.fork()));
            node.pods.lock().insert(pod.uid.clone(), (pod, sdk.abort_handle()));
        }
        nodes.push(node);
    }

    let mut events = JoinSet::new();
    // Churn: each node replaces pods at random (a Poisson process).
    if config.churn_per_hour > 0.0 {
        for node in &nodes {
            let (shared, node, mut rng) = (shared.clone(), node.clone(), rng.fork());
            let mean = 3600.0 / (config.churn_per_hour * config.pods_per_node as f64);
            events.spawn(async move {
                loop {
                    let wait = -mean * (1.0 - rng.f64()).ln();
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    let victim = {
                        let pods = node.pods.lock();
                        let apps: Vec<&String> = pods
                            .iter()
                            .filter(|(_, (pod, _))| !pod.name.starts_with("job-"))
                            .map(|(uid, _)| uid)
                            .collect();
                        (!apps.is_empty()).then(|| apps[rng.usize(..apps.len())].clone())
                    };
                    let Some(victim) = victim else { continue };
                    let daemonset = node.pods.lock().get(&victim).and_then(|(pod, _)| {
                        (pod.namespace == "kube-system")
                            .then(|| pod.role_annotation.as_deref()?.trim_start_matches("role-").parse().ok())
                            .flatten()
                    });
                    remove_pod(&node, &victim);
                    let pod =
                        pod_of(&shared.config, (&node.name, node.pool, &node.next_pod), &mut rng, daemonset, false);
                    let first = Duration::from_millis(500 + rng.u64(..2500));
                    add_pod(&shared, &node, pod, first, &mut rng);
                }
            });
        }
    }
    // A rolling update with hand-over: nodes one after the other, evenly over the period.
    if let Some((at, over)) = config.rollout {
        let (shared, nodes) = (shared.clone(), nodes.clone());
        events.spawn(async move {
            for (i, node) in nodes.iter().enumerate() {
                tokio::time::sleep_until(started + at + over.mul_f64(i as f64 / nodes.len() as f64)).await;
                let adopted = node.agent().hand_over();
                let successor = Agent::start(&shared, &node.name, &node.listing(), adopted).await;
                *node.agent.lock() = Arc::new(successor);
            }
        });
    }
    // Every agent crashing at once: restarted with nothing cached.
    if let Some(at) = config.crash_at {
        let (shared, nodes) = (shared.clone(), nodes.clone());
        events.spawn(async move {
            tokio::time::sleep_until(started + at).await;
            for node in &nodes {
                let fresh = Agent::start(&shared, &node.name, &node.listing(), Vec::new()).await;
                *node.agent.lock() = Arc::new(fresh);
            }
        });
    }
    // An hour of job bursts.
    if let Some(at) = config.bursts_at {
        for node in &nodes {
            let (shared, node, mut rng) = (shared.clone(), node.clone(), rng.fork());
            events.spawn(async move {
                let mut wave = started + at;
                while wave < started + at + Duration::from_secs(3600) {
                    for _ in 0..shared.config.burst_jobs {
                        let (shared, node, mut rng) = (shared.clone(), node.clone(), rng.fork());
                        let start = wave + shared.config.burst_spread.mul_f64(rng.f64());
                        tokio::spawn(async move {
                            tokio::time::sleep_until(start).await;
                            let pod =
                                pod_of(&shared.config, (&node.name, node.pool, &node.next_pod), &mut rng, None, true);
                            let uid = pod.uid.clone();
                            let first = Duration::from_millis(500 + rng.u64(..2500));
                            add_pod(&shared, &node, pod, first, &mut rng);
                            tokio::time::sleep(shared.config.job_runs).await;
                            remove_pod(&node, &uid);
                        });
                    }
                    wave += shared.config.burst_every;
                }
            });
        }
    }

    if config.progress {
        let (shared, sts) = (shared.clone(), sts.clone());
        let wall = std::time::Instant::now();
        events.spawn(async move {
            let mut ticks = tokio::time::interval_at(started + Duration::from_secs(600), Duration::from_secs(600));
            loop {
                ticks.tick().await;
                eprintln!(
                    "{:>4} min simulated in {:.0} s: {} AssumeRole calls, {} throttled, {} pod-visible failures",
                    started.elapsed().as_secs() / 60,
                    wall.elapsed().as_secs_f64(),
                    sts.calls.load(Ordering::Relaxed),
                    sts.throttled.load(Ordering::Relaxed),
                    shared.failures.load(Ordering::Relaxed),
                );
            }
        });
    }
    tokio::time::sleep_until(started + config.duration).await;
    events.abort_all();
    let per_second = {
        let mut series = sts.per_second.lock().clone();
        series.resize(config.duration.as_secs() as usize, 0);
        series
    };
    let (throttled_at, failed_at) = (sts.throttled_at.lock().clone(), shared.failed_at.lock().clone());
    let phase = |name: &'static str, from: Option<Duration>, length: Duration| {
        from.map(|from| {
            let start = (from.as_secs() as usize).min(per_second.len());
            let end = (start + length.as_secs() as usize).min(per_second.len());
            let within = |at: &&u32| (start..end).contains(&(**at as usize));
            Phase {
                name,
                assume_role_per_s: Spread::of(&per_second[start..end]),
                calls: per_second[start..end].iter().map(|&n| u64::from(n)).sum(),
                throttled: throttled_at.iter().filter(within).count() as u64,
                pod_visible_failures: failed_at.iter().filter(within).count() as u64,
            }
        })
    };
    let scaled = |d: Duration| d.mul_f64(config.duration.as_secs_f64() / (4.0 * 3600.0));
    let mut phases = Vec::new();
    let quiet = config.rollout.map_or(config.duration, |(at, _)| at);
    phases.extend(phase("steady", Some(Duration::ZERO), quiet));
    phases.extend(config.rollout.and_then(|(at, over)| phase("rollout", Some(at), over)));
    phases.extend(phase("crash", config.crash_at, scaled(Duration::from_secs(40 * 60))));
    phases.extend(phase("bursts", config.bursts_at, Duration::from_secs(3600)));
    let late = shared.metrics.credentials_served_late.get();
    let throttled_calls = shared.metrics.sts_calls.get_or_create(&StsLabels { result: "throttled" }).get();
    debug_assert!(throttled_calls <= sts.throttled.load(Ordering::Relaxed));
    FleetReport {
        nodes: config.nodes,
        pods: config.nodes * config.pods_per_node,
        scope: config.scope,
        assume_role_per_s: Spread::of(&per_second),
        assume_role_calls: sts.calls.load(Ordering::Relaxed),
        throttled: sts.throttled.load(Ordering::Relaxed),
        pod_visible_failures: shared.failures.load(Ordering::Relaxed),
        requests: shared.requests.load(Ordering::Relaxed),
        late_credentials: late,
        phases,
    }
}
