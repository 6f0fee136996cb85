//! Startup order and graceful shutdown. Owns the tasks.
//!
//! Order matters: discovery first (policy needs the base ARN), then the listeners (so a port
//! conflict fails fast, before any watch starts), then the watches and the prefetcher, then
//! serving. `/readyz` turns ready once the caches have synced.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
use crate::imds::upstream::report_node_exposure;
use crate::imds::{ImdsService, ImdsSettings, UpstreamImds};
use crate::metrics::{Metrics, RefusalLabels};
use crate::netfilter::agent::{NodeCluster, RulesOnExit};
use crate::netfilter::{NetworkSettings, RulesState};
use crate::ports::Ports;
use crate::resolve::Resolver;
use crate::shutdown::Stopped;

/// How long iamlet waits for the node's metadata service.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors that stop the agent from starting. Each names what to fix. The lower modules return
/// their own errors; this is where they meet.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listening port could not be bound.
    #[error("cannot listen on {addr} ({flag}): {source}{hint}")]
    Bind { flag: &'static str, addr: SocketAddr, source: std::io::Error, hint: &'static str },
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
    stop: watch::Sender<bool>,
    servers: JoinSet<()>,
    background: JoinSet<()>,
    /// iamlet's rules and what decides their fate on stop.
    rules: Option<RulesOnExit>,
}

impl RunningAgent {
    /// Stops accepting, lets in-flight requests finish (bounded by the grace period), stops
    /// the watches, then keeps or removes iamlet's rules (`--iptables-keep-on-exit`).
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        while self.servers.join_next().await.is_some() {}
        self.background.shutdown().await;
        if let Some(rules) = self.rules {
            rules.finish().await;
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

/// Starts the agent: discovery, listeners, watches, prefetcher, servers. Each step is the
/// component's own; this only puts them in order.
pub async fn start(config: Config, deps: Dependencies) -> Result<RunningAgent, StartupError> {
    let Config { node, settings } = config;
    let Settings { network, policy: policy_settings, sts, imds: api, admin: admin_settings, .. } = &settings;
    IgnoredFlag::announce(&settings.ignored_flags);
    sts.announce();
    api.announce();
    admin_settings.announce(api.app_port);
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(UpstreamImds::new(api.metadata_addr.clone(), UPSTREAM_TIMEOUT));
    let policy = Arc::new(crate::policy::discover(policy_settings, upstream.as_ref(), &deps.sts).await?);
    let listeners = Listeners::bind(network, api.app_port, admin_settings.metrics_port).await?;
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
        sts.session_tags.clone(),
        caches.namespaces.clone(),
        caches.service_accounts.clone(),
    ));
    let liveness = Arc::new(Liveness::default());
    let credentials = CredentialCache::new(deps.sts, sts.clone(), liveness, metrics.clone());
    crate::credentials::keep_ahead(&credentials, resolver.clone(), changed, &mut background);

    // Events on pods: always for pods the rules miss, and with --pod-events for pods that
    // get no credentials.
    let (events, publisher) = PodEvents::start(deps.kube.clone(), &node);
    background.spawn(publisher);
    let imds =
        ImdsService::new(api, &node, caches.pods.clone(), resolver, credentials.clone(), upstream, metrics.clone());
    // What each request's pod is checked against once the pod port binding is on.
    let ports = Ports::default();
    let imds = Arc::new(imds.with_events(api.pod_events.then(|| events.clone())).with_ports(ports.clone()));
    background.spawn(report_node_exposure(imds.upstream().clone(), metrics.clone()));

    let mut readiness = readiness(&caches);
    let rules = match network.iptables {
        true => {
            let cluster =
                NodeCluster { kube: &deps.kube, node: &node, pods: &caches.pods, events: &events, ports: &ports };
            let port = listeners.app_addr.port();
            let (rules, state) =
                crate::netfilter::agent::guard(network, port, cluster, &metrics, &mut background).await?;
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
        credentials,
        metrics: metrics.clone(),
        debug: admin_settings.debug,
        readiness,
    };
    let (app_addr, admin_addr) = (listeners.app_addr, listeners.admin_addr);
    let (stop, servers) = listeners.serve(imds, Arc::new(admin), api, metrics.connections_refused.clone());
    tracing::info!(%app_addr, admin_addr = ?admin_addr, "serving");
    Ok(RunningAgent { app_addr, admin_addr, stop, servers, background, rules })
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

/// The agent's sockets, bound before anything starts so a port conflict fails fast.
struct Listeners {
    /// The metadata API: the IPv4 (or only) address, and the IPv6 one when given.
    app: Vec<TcpListener>,
    admin: Option<TcpListener>,
    app_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(network: &NetworkSettings, app_port: u16, metrics_port: Option<u16>) -> Result<Self, StartupError> {
        let bind_ip = network.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let app_listener = bind("--app-port", SocketAddr::new(bind_ip, app_port)).await?;
        let app_addr = app_listener.local_addr().expect("a bound socket has an address");
        let mut app = vec![app_listener];
        if let Some(v6) = network.host_ipv6 {
            app.push(bind("--app-port", SocketAddr::new(IpAddr::V6(v6), app_addr.port())).await?);
        }
        let admin = match metrics_port {
            Some(port) => Some(bind("--metrics-port", SocketAddr::new(bind_ip, port)).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|admin| admin.local_addr().expect("a bound socket has an address"));
        Ok(Self { app, admin, app_addr, admin_addr })
    }

    /// Serves the metadata API and the admin port until the returned sender says stop.
    fn serve(
        self,
        imds: Arc<ImdsService>,
        admin: Arc<AdminService>,
        api: &ImdsSettings,
        refusals: Family<RefusalLabels, Counter>,
    ) -> (watch::Sender<bool>, JoinSet<()>) {
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
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
                until_stopped(stopped.clone()),
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
                until_stopped(stopped),
                grace,
                crate::http::Limits::default(),
                |_| {},
            ));
        }
        (stop, servers)
    }
}

async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another process holds this port: kube2iam or a previous iamlet still running on this node? stop it or choose another port)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (the address is not on this host: check --host-ip)",
            std::io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
            _ => "",
        };
        StartupError::Bind { flag, addr, source, hint }
    })
}
