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

use crate::admin::{AdminService, AdminSettings, Readiness};
use crate::cli::{Config, Settings};
use crate::cluster::health::WatchHealth;
use crate::cluster::watch::{
    NamespaceSink, PodSink, Reresolve, ServiceAccountSink, watch_namespaces, watch_pods, watch_service_accounts,
};
use crate::cluster::{AnnotationKeys, NamespaceRules, NamespaceStore, PodStore, ServiceAccountStore};
use crate::credentials::{AwsSts, CredentialCache, Prefetcher, RoleAssumer, StsSettings};
use crate::imds::{ImdsService, ImdsSettings, UpstreamImds};
use crate::metrics::{Metrics, RefusalLabels};
use crate::netfilter::NetworkSettings;
use crate::netfilter::agent::{NodeCluster, RulesOnExit};
use crate::policy::{BaseArn, RoleArn};
use crate::resolve::Resolver;
use crate::shutdown::Stopped;

/// How often every cached credential is checked for a due refresh.
const REFRESH_SCAN_PERIOD: Duration = Duration::from_secs(30);
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

/// Starts the agent: discovery, listeners, watches, prefetcher, servers.
pub async fn start(config: Config, deps: Dependencies) -> Result<RunningAgent, StartupError> {
    let Config { node, settings } = config;
    let Settings {
        pod_watch_stale_after,
        network,
        policy: policy_settings,
        sts,
        imds: api,
        admin: admin_settings,
        ignored_flags,
        ..
    } = settings;
    for ignored in ignored_flags {
        tracing::info!(flag = ignored.flag, "kube2iam flag accepted without effect: {}", ignored.why);
    }
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(UpstreamImds::new(api.metadata_addr.clone(), UPSTREAM_TIMEOUT));
    let policy = Arc::new(crate::policy::discover(&policy_settings, upstream.as_ref(), &deps.sts).await?);
    tracing::info!(
        base_arn = policy.base.as_ref().map(BaseArn::as_str),
        default_role = policy.default_role.as_ref().map(RoleArn::as_str),
        %node,
        "policy ready"
    );

    let (sessions, session_tags) = (sts.sessions, sts.session_tags.clone());
    if let Some(role) = &sts.assume_role_arn {
        tracing::info!(%role, "pods' roles are assumed with this intermediate role's session (--assume-role-arn)");
    }
    if let Some(tagging) = &session_tags {
        tracing::info!(
            cluster_name = tagging.cluster_name.as_deref(),
            "sessions carry the pods' tags (--session-tags)"
        );
    }
    warn_about_overrides(&sts, &api, &admin_settings);
    let listeners = Listeners::bind(&network, api.app_port, admin_settings.metrics_port).await?;
    let (app_addr, admin_addr) = (listeners.app_addr, listeners.admin_addr);

    let pods = PodStore::new();
    let namespaces = policy_settings.namespace_restrictions.map(|_| NamespaceStore::new());
    let service_accounts = policy_settings.service_account_roles.then(ServiceAccountStore::new);
    let credentials = CredentialCache::new(deps.sts, sts, metrics.clone());

    let mut background = JoinSet::new();
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let keys = AnnotationKeys {
        role: policy_settings.iam_role_key.clone(),
        external_id: policy_settings.iam_external_id.clone(),
    };
    if let Some(store) = &service_accounts {
        let reresolve = Reresolve::new(pods.clone(), changes_tx.clone());
        let sink = ServiceAccountSink::new(store.clone(), keys.clone(), reresolve);
        background.spawn(watch_service_accounts(deps.kube.clone(), sink, metrics.clone()));
    }
    let sink = PodSink::new(pods.clone(), keys, changes_tx, metrics.clone());
    let (kube, watched_node) = (deps.kube.clone(), node.clone());
    let pod_watch = Arc::new(WatchHealth::new(std::time::Instant::now()));
    let health = pod_watch.clone();
    background.spawn(async move { watch_pods(kube, &watched_node, sink, health).await });
    let confirm_every = (pod_watch_stale_after / 3).min(Duration::from_secs(10));
    background.spawn(crate::cluster::health::confirm_reachable(deps.kube.clone(), pod_watch.clone(), confirm_every));
    background.spawn(crate::cluster::health::export(pod_watch.clone(), metrics.pod_watch_stale_seconds.clone()));
    if let (Some(store), Some(format)) = (&namespaces, policy_settings.namespace_restrictions) {
        let rules = NamespaceRules {
            annotation: policy_settings.namespace_key.clone(),
            format,
            base: policy.base.clone(),
            account: policy.account.clone(),
        };
        let sink = NamespaceSink::new(store.clone(), rules);
        background.spawn(watch_namespaces(deps.kube.clone(), sink, metrics.clone()));
    }
    let mut resolver = Resolver::new(policy, sessions);
    if let Some(store) = &namespaces {
        resolver = resolver.with_namespaces(store.clone());
    }
    if let Some(store) = &service_accounts {
        resolver = resolver.with_service_accounts(store.clone());
    }
    if let Some(tagging) = session_tags {
        resolver = resolver.with_session_tags(tagging);
    }
    let resolver = Arc::new(resolver);
    let prefetcher = Prefetcher::new(credentials.clone(), resolver.clone());
    background.spawn(prefetcher.run(changes_rx));
    let live_pods = pods.clone();
    let live_sessions = move || live_pods.read(|index| index.pods().map(|pod| sessions.name(pod)).collect());
    background.spawn(credentials.clone().refresh_every(REFRESH_SCAN_PERIOD, live_sessions));

    // Events on pods: always for pods the rules miss, and with --pod-events for pods that
    // get no credentials.
    let (events, publisher) = crate::cluster::PodEvents::start(deps.kube.clone(), &node);
    background.spawn(publisher);
    let imds = ImdsService::new(&api, &node, pods.clone(), resolver, credentials.clone(), upstream, metrics.clone());
    let imds = Arc::new(imds.with_events(api.pod_events.then(|| events.clone())));
    let mut checks: Vec<crate::admin::ReadinessCheck> = Vec::new();
    let stale_after = pod_watch_stale_after;
    checks.push((
        "pod watch failing for longer than --pod-watch-stale-after",
        Box::new(move || pod_watch.stale_for(std::time::Instant::now()) <= stale_after),
    ));
    let rules = match network.iptables {
        true => {
            let port = app_addr.port();
            let cluster = NodeCluster { kube: &deps.kube, node: &node, pods: &pods, events: &events };
            let (rules, in_place) =
                crate::netfilter::agent::guard(&network, port, cluster, &metrics, &mut background).await?;
            checks.push(("netfilter rules not in place", in_place));
            Some(rules)
        }
        false => None,
    };
    let readiness = Arc::new(Readiness {
        pods: pods.clone(),
        namespaces: namespaces.clone(),
        service_accounts: service_accounts.clone(),
        checks,
    });
    if let Some(taint) = network.startup_taint.clone() {
        let (readiness, kube, node) = (readiness.clone(), deps.kube.clone(), node.clone());
        background.spawn(async move {
            readiness.ready().await;
            crate::cluster::taint::remove(kube, &node, &taint).await;
        });
    }
    {
        let (upstream, metrics) = (imds.upstream().clone(), metrics.clone());
        background.spawn(async move { crate::imds::upstream::report_node_exposure(&upstream, &metrics).await });
    }
    let refusals = metrics.connections_refused.clone();
    let admin = Arc::new(AdminService {
        pods,
        namespaces,
        service_accounts,
        credentials,
        metrics,
        debug: admin_settings.debug,
        readiness,
    });

    let (stop, servers) = listeners.serve(imds, admin, &api, refusals);
    tracing::info!(%app_addr, admin_addr = ?admin_addr, "serving");
    Ok(RunningAgent { app_addr, admin_addr, stop, servers, background, rules })
}

/// Warns about flags iamlet honours only in part.
fn warn_about_overrides(sts: &StsSettings, api: &ImdsSettings, admin: &AdminSettings) {
    if admin.metrics_port.is_none() {
        tracing::warn!(
            app_port = api.app_port,
            "--metrics-port equals --app-port (kube2iam's default): /metrics, /readyz and /debug/store are not \
             served, since every pod reaches --app-port; /healthz is; give --metrics-port a port of its own \
             (iamlet's default is 8182) to serve them"
        );
    }
    if let Some(requested) = sts.sessions.lowered_from() {
        tracing::warn!(
            requested = %humantime::format_duration(requested),
            used = %humantime::format_duration(sts.sessions.refresh_before()),
            "--iam-role-session-ttl is lowered: STS caps role-chained sessions (an instance profile's, IRSA's) at 1h \
             and sessions last twice the TTL; credentials are refreshed with this much left"
        );
    }
    let allow = &api.allow_route_regexp;
    match (allow.operator(), allow.keeps_default()) {
        (None, true) => {}
        (operator, keeps_default) => {
            let additions = allow.additions();
            tracing::info!(
                allow_route_regexp = operator.unwrap_or_default(),
                default_list = if keeps_default { "kept" } else { "dropped (--allow-route-regexp-only)" },
                adds = %if additions.is_empty() { "no well-known path".to_string() } else { additions.join(", ") },
                "metadata paths relayed to the node's metadata service: the default harmless list and what \
                 --allow-route-regexp admits, each with or without a trailing slash"
            );
        }
    }
    let overreach = allow.overreach();
    if !overreach.is_empty() {
        tracing::warn!(
            paths = %overreach.join(", "),
            "--allow-route-regexp matches paths that iamlet never relays (they identify or empower the node); \
             they stay refused"
        );
    }
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
