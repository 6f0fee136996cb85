//! Startup order, the hand-over between agents, and graceful shutdown. Owns the tasks.
//!
//! Order matters: the token key first, discovery (policy needs the base ARN), then the
//! predecessor's hand-over or the listeners (so a port conflict fails fast, before any watch
//! starts), then the watches and the prefetcher (what a predecessor cached is adopted before
//! they start), then serving: at once on a cold start, once ready after a hand-over (the
//! predecessor serves meanwhile). `/readyz` turns ready once the caches have synced.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::admin::{AdminService, Condition, Readiness};
use crate::cli::{Config, IgnoredFlag, Settings};
use crate::cluster::{AnnotationKeys, CacheSettings, Caches, NamespaceRules, PodEvents};
use crate::credentials::{AwsSts, CredentialCache, Liveness, RoleAssumer};
use crate::handover::wire::Offered;
use crate::handover::{Handing, Inheritance, Progress, Start};
use crate::http::Phase;
use crate::imds::upstream::report_node_exposure;
use crate::imds::{ImdsService, ImdsSettings, UpstreamImds};
use crate::metrics::{Metrics, RefusalLabels};
use crate::netfilter::agent::{NodeCluster, RulesOnExit};
use crate::netfilter::{NetworkSettings, RulesState};
use crate::ports::Ports;
use crate::resolve::Resolver;
use crate::shutdown::Stopped;
use crate::state::StateDir;

/// How long iamlet waits for the node's metadata service.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors that stop the agent from starting. Each names what to fix. The lower modules return
/// their own errors; this is where they meet.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listening port could not be bound.
    #[error("cannot listen on {addr} ({flag}): {source}{hint}")]
    Bind { flag: &'static str, addr: SocketAddr, source: std::io::Error, hint: &'static str },
    /// A port iamlet listens on is held by a process of another user: with iamlet's rules kept
    /// (after a crash), pods' metadata requests reach that process.
    #[error(
        "cannot listen on {addr} ({flag}): a process of uid {holder}, not iamlet's, holds it, and pods' metadata requests \
         reach it while it does: find it on the node with `ss -ltnp 'sport = :{}'` and stop it (a port below 1024 \
         cannot be taken by an unprivileged process)",
        addr.port()
    )]
    Squatted { flag: &'static str, addr: SocketAddr, holder: u32 },
    /// The Kubernetes API server configuration could not be loaded.
    #[error("cannot configure the Kubernetes client")]
    Kube(#[from] crate::cluster::client::ClientError),
    /// iptables cannot be run, or not with the capabilities iamlet needs.
    #[error(transparent)]
    Netfilter(#[from] crate::netfilter::IptablesError),
    /// The policy the flags ask for cannot be built (a default role, discovery).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

/// The outside services the agent talks to, built from the environment by [`run`] and
/// passed explicitly by tests.
pub struct Dependencies {
    pub kube: kube::Client,
    pub sts: Arc<dyn RoleAssumer>,
}

/// A started agent.
pub struct RunningAgent {
    /// Where the metadata API listens.
    pub app_addr: SocketAddr,
    /// Where the admin endpoints listen: nowhere when `--metrics-port` equals `--app-port`.
    pub admin_addr: Option<SocketAddr>,
    /// The servers' phase: draining on stop.
    phase: Arc<watch::Sender<Phase>>,
    /// Tells the hand-over that the agent is stopping.
    leaving: watch::Sender<bool>,
    /// How far a hand-over to a successor has come.
    progress: watch::Receiver<Progress>,
    grace: Duration,
    servers: JoinSet<()>,
    background: JoinSet<()>,
    /// iamlet's rules and what decides their fate on stop.
    rules: Option<RulesOnExit>,
}

impl RunningAgent {
    /// Stops: a successor taking over is told so and given up to the grace period to accept;
    /// then no more accepting, in-flight requests finish (bounded by the grace period), the
    /// watches stop, and iamlet's rules are kept or removed (`--iptables-keep-on-exit`; kept,
    /// whatever it says, once a successor took over).
    pub async fn stop(mut self) {
        self.leaving.send_replace(true);
        let settled = async {
            let _ = self.progress.wait_for(|p| *p != Progress::Handing).await;
        };
        if tokio::time::timeout(self.grace, settled).await.is_err() {
            tracing::warn!("the successor did not take over within the grace period: stopping anyway");
        }
        self.phase.send_replace(Phase::Draining);
        while self.servers.join_next().await.is_some() {}
        self.background.shutdown().await;
        let handed_over = *self.progress.borrow() == Progress::HandedOver;
        if let Some(rules) = self.rules {
            rules.finish(handed_over).await;
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT, then drains, unless a second signal comes first.
pub async fn run(config: Config) -> anyhow::Result<Stopped> {
    let mut signals = crate::shutdown::Signals::install().context("installing the SIGTERM and SIGINT handlers")?;
    let kube = crate::cluster::client::client(&config.settings.kube).await?;
    let sts = AwsSts::from_environment(&config.settings.sts.client(&config.node)).await.into_assumer();
    let agent = start(config, Dependencies { kube, sts }).await?;
    let signal = signals.next().await;
    tracing::info!(signal, "shutting down: draining in-flight requests");
    let stopped = tokio::select! {
        () = agent.stop() => Stopped::Drained,
        signal = signals.next() => {
            tracing::warn!(signal, "second signal: exiting without draining");
            Stopped::Aborted
        }
    };
    tracing::info!(?stopped, "stopped");
    Ok(stopped)
}

/// Starts the agent: the state directory and the token key, discovery, the predecessor's
/// hand-over or the listeners, watches, prefetcher, rules, servers. Each step is the
/// component's own; this only puts them in order.
pub async fn start(config: Config, deps: Dependencies) -> Result<RunningAgent, StartupError> {
    let Config { node, state_dir, settings } = config;
    let Settings { network, policy: policy_settings, sts, imds: api, admin: admin_settings, .. } = &settings;
    IgnoredFlag::announce(&settings.ignored_flags);
    sts.announce();
    api.announce();
    admin_settings.announce(api.app_port);
    let metrics = Arc::new(Metrics::new());
    let state = StateDir::open(&state_dir).inspect_err(
        |error| tracing::warn!(%error, "no state directory: tokens and credentials will not outlive this agent"),
    );
    let tokens = crate::imds::token_key::issuer(state.as_ref());
    let upstream = Arc::new(UpstreamImds::new(api.metadata_addr.clone(), UPSTREAM_TIMEOUT));
    let policy = Arc::new(crate::policy::discover(policy_settings, upstream.as_ref(), &deps.sts).await?);
    let takeover = match &state {
        Ok(dir) => crate::handover::take_over(dir).await,
        Err(_) => Start::Cold { why: "no state directory".into(), predecessor: false },
    };
    let (listeners, inheritance) =
        Listeners::acquire(network, api.app_port, admin_settings.metrics_port, takeover).await?;
    let mut background = JoinSet::new();

    let (changes, changed) = mpsc::unbounded_channel();
    let cache_settings = CacheSettings {
        keys: AnnotationKeys::of(policy_settings),
        namespace_rules: NamespaceRules::configured(policy_settings, &policy),
        service_account_roles: policy_settings.service_account_roles,
        pod_watch_stale_after: settings.pod_watch_stale_after,
    };
    let caches = Caches::start(&deps.kube, &node, cache_settings, &metrics, changes, &mut background);
    let resolver = Arc::new(Resolver::configured(
        policy,
        sts.sessions.clone(),
        &node,
        caches.namespaces.clone(),
        caches.service_accounts.clone(),
    ));
    let liveness = Arc::new(Liveness::default());
    let credentials = CredentialCache::new(deps.sts, sts.clone(), liveness, metrics.clone());
    let inheritance = match inheritance {
        Some(mut inheritance) => {
            let adopted = credentials.adopt(std::mem::take(&mut inheritance.credentials)).await;
            tracing::info!(credentials = adopted, "adopted the predecessor's cached credentials");
            Some(inheritance)
        }
        None => None,
    };
    let pods_synced = caches.pods.synced().subscribe();
    let dir = state.as_ref().ok().cloned();
    crate::credentials::keep_ahead(&credentials, resolver.clone(), changed, pods_synced, dir, &mut background);

    // Events on pods: always for pods the rules miss, and with --pod-events for pods that
    // get no credentials.
    let (events, publisher) = PodEvents::start(deps.kube.clone(), &node);
    background.spawn(publisher);
    let imds =
        ImdsService::new(api, &node, caches.pods.clone(), resolver, credentials.clone(), upstream, metrics.clone());
    // What each request's pod is checked against once the pod port binding is on.
    let ports = Ports::default();
    let imds = imds.with_tokens(tokens).with_events(api.pod_events.then(|| events.clone()));
    let imds = Arc::new(imds.with_ports(ports.clone()));
    background.spawn(report_node_exposure(imds.upstream().clone(), metrics.clone()));

    // This agent keeps the rules until a successor takes over.
    let (holds_rules, holds) = watch::channel(true);
    let mut readiness = readiness(&caches);
    let rules = match network.iptables {
        true => {
            let cluster =
                NodeCluster { kube: &deps.kube, node: &node, pods: &caches.pods, events: &events, ports: &ports };
            let port = listeners.app_addr.port();
            let (rules, state) =
                crate::netfilter::agent::guard(network, port, cluster, holds, &metrics, &mut background).await?;
            readiness.require(Condition::new("netfilter rules not in place", state, RulesState::is_in_place));
            Some(rules)
        }
        false => None,
    };
    let readiness = Arc::new(readiness);
    if let Some(taint) = network.startup_taint.clone() {
        let (ready, kube, node) = (readiness.clone(), deps.kube.clone(), node.clone());
        background.spawn(async move { crate::cluster::taint::remove(kube, &node, &taint, ready.ready()).await });
    }
    let admin = AdminService {
        pods: caches.pods,
        namespaces: caches.namespaces,
        service_accounts: caches.service_accounts,
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        debug: admin_settings.debug,
        readiness: readiness.clone(),
    };
    let (app_addr, admin_addr) = (listeners.app_addr, listeners.admin_addr);
    let (phase, serving) = watch::channel(Phase::Waiting);
    let phase = Arc::new(phase);
    let handed_listeners = listeners.copies();
    let servers = listeners.serve(imds, Arc::new(admin), api, metrics.connections_refused.clone(), serving);
    let (progress_sender, progress) = watch::channel(Progress::Serving);
    let (leaving, leaving_signal) = watch::channel(false);
    let handing = Handing {
        listeners: handed_listeners,
        credentials,
        rules: holds_rules,
        phase: phase.clone(),
        progress: progress_sender,
    };
    background.spawn(take_turn(inheritance, readiness, state.ok(), handing, leaving_signal));
    tracing::info!(%app_addr, admin_addr = ?admin_addr, "serving");
    let grace = api.shutdown_grace_period;
    Ok(RunningAgent { app_addr, admin_addr, phase, leaving, progress, grace, servers, background, rules })
}

/// Accepts on the listeners, at once on a cold start, or once ready after a predecessor's
/// hand-over (it serves meanwhile); then listens for a successor of its own.
async fn take_turn(
    inheritance: Option<Inheritance>,
    readiness: Arc<Readiness>,
    state: Option<StateDir>,
    handing: Handing,
    leaving: watch::Receiver<bool>,
) {
    match inheritance {
        Some(inheritance) => inheritance.complete(readiness.ready(), &handing.phase).await,
        None => {
            handing.phase.send_replace(Phase::Accepting);
        }
    }
    if let Some(dir) = state {
        crate::handover::serve(dir, handing, leaving).await;
    }
}

/// What the agent waits for before it is ready: each cache synced, and the pod watch current.
fn readiness(caches: &Caches) -> Readiness {
    let mut readiness = Readiness::default();
    readiness.require(Condition::synced("pod cache not synced", caches.pods.synced()));
    if let Some(store) = &caches.namespaces {
        readiness.require(Condition::synced("namespace cache not synced", store.synced()));
    }
    if let Some(store) = &caches.service_accounts {
        readiness.require(Condition::synced("ServiceAccount cache not synced", store.synced()));
    }
    readiness.require(Condition::new(
        "pod watch failing for longer than --pod-watch-stale-after",
        caches.pod_watch_current.clone(),
        |current| *current,
    ));
    readiness
}

/// The agent's sockets: its predecessor's, or bound before anything starts so a port conflict
/// fails fast.
struct Listeners {
    /// The metadata API: the IPv4 (or only) address, and the IPv6 one when given.
    app: Vec<TcpListener>,
    admin: Option<TcpListener>,
    app_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

/// How long a successor that starts cold beside a predecessor waits for its ports.
const PORTS_WAIT: Duration = Duration::from_secs(120);

impl Listeners {
    /// The listeners the flags ask for: each taken from the predecessor's hand-over when it
    /// offered that address, else bound. A predecessor that refused the hand-over still holds
    /// the ports: they are bound as soon as it releases them (it stops on its SIGTERM).
    /// Returns the hand-over to complete, when one was taken.
    async fn acquire(
        network: &NetworkSettings,
        app_port: u16,
        metrics_port: Option<u16>,
        takeover: Start,
    ) -> Result<(Self, Option<Inheritance>), StartupError> {
        let bind_ip = network.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut wanted = vec![("app", "--app-port", SocketAddr::new(bind_ip, app_port))];
        if let Some(v6) = network.host_ipv6 {
            wanted.push(("app", "--app-port", SocketAddr::new(IpAddr::V6(v6), app_port)));
        }
        if let Some(port) = metrics_port {
            wanted.push(("admin", "--metrics-port", SocketAddr::new(bind_ip, port)));
        }
        let (mut inherited, inheritance, wait) = match takeover {
            Start::Inherited(mut inheritance) => {
                let listeners = std::mem::take(&mut inheritance.listeners);
                let matches = listeners.len() == wanted.len()
                    && wanted
                        .iter()
                        .all(|(name, _, addr)| listeners.iter().any(|(o, _)| o.name == *name && o.addr == *addr));
                if matches {
                    tracing::info!("took the predecessor's listening sockets: serving from them once ready");
                    (listeners, Some(inheritance), false)
                } else {
                    let offered: Vec<String> =
                        listeners.iter().map(|(o, _)| format!("{} {}", o.name, o.addr)).collect();
                    tracing::warn!(
                        offered = %offered.join(", "),
                        "the predecessor listens elsewhere (the flags changed): starting cold, binding once it releases the ports"
                    );
                    (Vec::new(), None, true)
                }
            }
            Start::Cold { why, predecessor } => {
                match predecessor {
                    true => tracing::warn!(reason = %why, "no hand-over from the predecessor: starting cold"),
                    false => tracing::info!(reason = %why, "no hand-over: starting cold"),
                }
                (Vec::new(), None, predecessor)
            }
        };
        let mut app = Vec::new();
        let mut admin = None;
        for (name, flag, addr) in wanted {
            let listener = match inherited.iter().position(|(o, _)| o.name == name && o.addr == addr) {
                Some(at) => adopt(flag, addr, inherited.swap_remove(at).1)?,
                None => bind(flag, addr, wait).await?,
            };
            match name {
                "admin" => admin = Some(listener),
                _ => app.push(listener),
            }
        }
        let app_addr = app[0].local_addr().expect("a bound socket has an address");
        let admin_addr = admin.as_ref().map(|admin| admin.local_addr().expect("a bound socket has an address"));
        Ok((Self { app, admin, app_addr, admin_addr }, inheritance))
    }

    /// Copies of the listening sockets, to hand over to a successor.
    fn copies(&self) -> Vec<(Offered, OwnedFd)> {
        let named = self.app.iter().map(|l| ("app", l)).chain(self.admin.iter().map(|l| ("admin", l)));
        named
            .filter_map(|(name, listener)| {
                let addr = listener.local_addr().ok()?;
                let copy = listener.as_fd().try_clone_to_owned().ok()?;
                Some((Offered { name: name.to_string(), addr }, copy))
            })
            .collect()
    }

    /// Serves the metadata API and the admin port as `phase` says.
    fn serve(
        self,
        imds: Arc<ImdsService>,
        admin: Arc<AdminService>,
        api: &ImdsSettings,
        refusals: Family<RefusalLabels, Counter>,
        phase: watch::Receiver<Phase>,
    ) -> JoinSet<()> {
        let mut servers = JoinSet::new();
        let grace = api.shutdown_grace_period;
        for listener in self.app {
            let imds = imds.clone();
            let refusals = refusals.clone();
            servers.spawn(crate::http::serve(
                listener,
                move |peer, request| {
                    let imds = imds.clone();
                    async move { imds.handle(peer.ip(), request).await }
                },
                phase.clone(),
                grace,
                api.limits,
                move |refusal| {
                    refusals.get_or_create(&RefusalLabels::from(refusal)).inc();
                },
            ));
        }
        // The admin port is the kubelet's and Prometheus's: the default limits.
        if let Some(listener) = self.admin {
            servers.spawn(crate::http::serve(
                listener,
                move |_, request| {
                    let admin = admin.clone();
                    async move { admin.handle(request).await }
                },
                phase,
                grace,
                crate::http::Limits::default(),
                |_| {},
            ));
        }
        servers
    }
}

/// The uid holding `addr`'s port, when it is not iamlet's own: no predecessor of iamlet's.
fn squatter(addr: SocketAddr) -> Option<u32> {
    crate::http::listener_uid(addr).filter(|holder| *holder != nix::unistd::geteuid().as_raw())
}

/// A listening socket handed over by the predecessor, for tokio.
fn adopt(flag: &'static str, addr: SocketAddr, listener: std::net::TcpListener) -> Result<TcpListener, StartupError> {
    listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)).map_err(|source| StartupError::Bind {
        flag,
        addr,
        source,
        hint: " (the socket the predecessor handed over)",
    })
}

/// Binds `addr`; with `wait`, a port still held (by a predecessor that handed nothing over)
/// is tried again until it is released, up to two minutes.
async fn bind(flag: &'static str, addr: SocketAddr, wait: bool) -> Result<TcpListener, StartupError> {
    let deadline = tokio::time::Instant::now() + PORTS_WAIT;
    let mut said = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(source) if source.kind() == std::io::ErrorKind::AddrInUse && squatter(addr).is_some() => {
                let holder = squatter(addr).unwrap_or_default();
                tracing::error!(%addr, flag, holder, "iamlet's port is held by a process of another user");
                return Err(StartupError::Squatted { flag, addr, holder });
            }
            Err(source)
                if wait && source.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline =>
            {
                if !std::mem::replace(&mut said, true) {
                    tracing::info!(%addr, flag, "waiting for the predecessor to release the port");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => {
                let hint = match source.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (another process holds this port: kube2iam or a previous iamlet still running on this node? stop it or choose another port)"
                    }
                    std::io::ErrorKind::AddrNotAvailable => " (the address is not on this host: check --host-ip)",
                    std::io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
                    _ => "",
                };
                return Err(StartupError::Bind { flag, addr, source, hint });
            }
        }
    }
}
