//! Startup order and graceful shutdown. Owns the tasks.
//!
//! Order matters: discovery first (policy needs the base ARN), then the listeners (so a port
//! conflict fails fast, before any watch starts), then the watches and the prefetcher, then
//! serving. `/readyz` turns ready once the caches have synced.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::StartupError;
use crate::admin::{AdminService, Readiness};
use crate::cli::{Config, Settings};
use crate::cluster::health::WatchHealth;
use crate::cluster::placement::{Controller, SelfPod};
use crate::cluster::watch::{NamespaceSink, PodSink, watch_namespaces, watch_pods};
use crate::cluster::{AnnotationKeys, NamespaceRules, NamespaceStore, PodStore};
use crate::credentials::{AwsSts, CredentialCache, Prefetcher, RoleAssumer};
use crate::imds::{ImdsService, UpstreamImds};
use crate::metrics::Metrics;
use crate::netfilter::coverage::Probe;
use crate::netfilter::lifecycle::{self, Decision, KeepOnExit};
use crate::netfilter::{NetworkSettings, NodeRules, RuleKeeper, RulesState};
use crate::policy::{BaseArn, RoleArn};
use crate::resolve::Resolver;

/// How often every cached credential is checked for a due refresh.
const REFRESH_SCAN_PERIOD: Duration = Duration::from_secs(30);
/// How long iamlet waits for the node's metadata service.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Where the admin endpoints listen.
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    servers: JoinSet<()>,
    background: JoinSet<()>,
    /// iamlet's rules and what decides their fate on stop.
    rules: Option<RulesOnExit>,
}

/// What [`RunningAgent::stop`] needs to keep or remove the rules (`--iptables-keep-on-exit`).
struct RulesOnExit {
    rules: NodeRules,
    keep: KeepOnExit,
    kube: kube::Client,
    node: String,
    pod: Option<SelfPod>,
    /// The agent's controller, looked up at startup.
    controller: Arc<OnceLock<Controller>>,
}

impl RulesOnExit {
    async fn finish(self) {
        let placement = match self.keep {
            KeepOnExit::Auto => {
                let known = self.controller.get().cloned();
                Some(crate::cluster::placement::placement(&self.kube, self.pod.as_ref(), known, &self.node).await)
            }
            _ => None,
        };
        let decision = lifecycle::decide(self.keep, || placement.expect("asked under auto"));
        tracing::info!("{decision}");
        if let Decision::Remove(_) = decision
            && let Err(error) = self.rules.remove().await
        {
            tracing::error!(%error, "could not remove iamlet's rules: run `iamlet cleanup` on this node");
        }
    }
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

/// Runs the agent until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let sts_settings = &config.settings.sts;
    let kube = crate::cluster::client::client(&config.settings.kube).await?;
    let sts =
        AwsSts::from_environment(sts_settings.use_regional_sts_endpoint, sts_settings.sts_timeout).await.into_assumer();
    let agent = start(config, Dependencies { kube, sts }).await?;
    let signal = crate::shutdown::signalled().await;
    tracing::info!(signal, "shutting down: draining in-flight requests");
    crate::shutdown::abort_on_second_signal();
    agent.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the agent: discovery, listeners, watches, prefetcher, servers.
pub async fn start(config: Config, deps: Dependencies) -> Result<RunningAgent, StartupError> {
    let Config { node, settings } = config;
    let Settings {
        pod_watch_stale_after, network, policy: policy_settings, sts, imds: api, admin: admin_settings, ..
    } = settings;
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(UpstreamImds::new(api.metadata_addr.clone(), UPSTREAM_TIMEOUT));
    let policy = Arc::new(crate::policy::discover(&policy_settings, upstream.as_ref(), &deps.sts).await?);
    tracing::info!(
        base_arn = policy.base.as_ref().map(BaseArn::as_str),
        default_role = policy.default_role.as_ref().map(RoleArn::as_str),
        %node,
        "policy ready"
    );

    let sessions = sts.sessions;
    if let Some(requested) = sessions.lowered_from() {
        tracing::warn!(
            requested = %humantime::format_duration(requested),
            used = %humantime::format_duration(sessions.refresh_before()),
            "--iam-role-session-ttl is lowered: STS caps role-chained sessions (an instance profile's, IRSA's) at 1h \
             and sessions last twice the TTL; credentials are refreshed with this much left"
        );
    }
    let overreach = api.allow_route_regexp.overreach();
    if !overreach.is_empty() {
        tracing::warn!(
            paths = %overreach.join(", "),
            "--allow-route-regexp matches paths that iamlet never relays (they identify or empower the node); \
             they stay refused"
        );
    }
    let bind_ip = network.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let app_listener = bind("--app-port", SocketAddr::new(bind_ip, api.app_port)).await?;
    let app_addr = app_listener.local_addr().expect("a bound socket has an address");
    let mut app_listeners = vec![app_listener];
    if let Some(v6) = network.host_ipv6 {
        app_listeners.push(bind("--app-port", SocketAddr::new(IpAddr::V6(v6), app_addr.port())).await?);
    }
    let admin_listener = bind("--metrics-port", SocketAddr::new(bind_ip, admin_settings.metrics_port)).await?;
    let admin_addr = admin_listener.local_addr().expect("a bound socket has an address");

    let pods = PodStore::new();
    let namespaces = policy_settings.namespace_restrictions.map(|_| NamespaceStore::new());
    let credentials = CredentialCache::new(deps.sts, sts, metrics.clone());

    let mut background = JoinSet::new();
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let keys = AnnotationKeys {
        role: policy_settings.iam_role_key.clone(),
        external_id: policy_settings.iam_external_id.clone(),
    };
    let sink = PodSink::new(pods.clone(), keys, changes_tx, metrics.clone());
    let (kube, watched_node) = (deps.kube.clone(), node.clone());
    let pod_watch = Arc::new(WatchHealth::new(std::time::Instant::now()));
    let health = pod_watch.clone();
    background.spawn(async move { watch_pods(kube, &watched_node, sink, health).await });
    let confirm_every = (pod_watch_stale_after / 3).min(Duration::from_secs(10));
    background.spawn(crate::cluster::health::confirm_reachable(deps.kube.clone(), pod_watch.clone(), confirm_every));
    {
        let (health, gauge) = (pod_watch.clone(), metrics.pod_watch_stale_seconds.clone());
        background.spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticks.tick().await;
                gauge.set(health.stale_for(std::time::Instant::now()).as_secs() as i64);
            }
        });
    }
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
    let resolver = Arc::new(Resolver::new(policy, namespaces.clone(), sessions));
    let prefetcher = Prefetcher::new(credentials.clone(), resolver.clone());
    background.spawn(prefetcher.run(changes_rx));
    let (refresher, live_pods) = (credentials.clone(), pods.clone());
    background.spawn(async move {
        let mut ticks = tokio::time::interval(REFRESH_SCAN_PERIOD);
        loop {
            ticks.tick().await;
            let live: std::collections::HashSet<String> =
                live_pods.read(|index| index.pods().map(|pod| sessions.name(pod)).collect());
            refresher.refresh_due(|session| live.contains(session)).await;
        }
    });

    let events = api.pod_events.then(|| {
        let (events, publisher) = crate::cluster::PodEvents::start(deps.kube.clone(), &node);
        background.spawn(publisher);
        events
    });
    let imds = ImdsService::new(&api, &node, pods.clone(), resolver, credentials.clone(), upstream, metrics.clone());
    let imds = Arc::new(imds.with_events(events));
    let mut checks: Vec<crate::admin::ReadinessCheck> = Vec::new();
    let stale_after = pod_watch_stale_after;
    checks.push((
        "pod watch failing for longer than --pod-watch-stale-after",
        Box::new(move || pod_watch.stale_for(std::time::Instant::now()) <= stale_after),
    ));
    let rules = match network.iptables {
        true => {
            let (rules, check) = start_rules(&network, app_addr.port(), &pods, &metrics, &mut background).await?;
            checks.push(("netfilter rules not in place", check));
            let pod = SelfPod::from_env();
            let controller = Arc::new(OnceLock::new());
            if let Some(pod) = pod.clone() {
                background.spawn(find_controller(deps.kube.clone(), pod, controller.clone()));
            }
            let (keep, kube, node) = (network.iptables_keep_on_exit, deps.kube.clone(), node.clone());
            Some(RulesOnExit { rules, keep, kube, node, pod, controller })
        }
        false => None,
    };
    let readiness = Arc::new(Readiness { pods: pods.clone(), namespaces: namespaces.clone(), checks });
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
    let admin =
        Arc::new(AdminService { pods, namespaces, credentials, metrics, debug: admin_settings.debug, readiness });

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = JoinSet::new();
    let grace = api.shutdown_grace_period;
    for listener in app_listeners {
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
                refusals.get_or_create(&crate::metrics::RefusalLabels::from(refusal)).inc();
            },
        ));
    }
    // The admin port is the kubelet's and Prometheus's: the default limits.
    servers.spawn(crate::http::serve(
        admin_listener,
        move |_, request| {
            let admin = admin.clone();
            async move { admin.handle(request).await }
        },
        until_stopped(stopped),
        grace,
        crate::http::Limits::default(),
        |_| {},
    ));
    tracing::info!(%app_addr, %admin_addr, "serving");
    Ok(RunningAgent { app_addr, admin_addr, stop, servers, background, rules })
}

/// Prepares iamlet's rules for each family the agent has an address on (failing fast on a
/// missing iptables or capability), and starts the tasks that own them: the keeper (detect,
/// install, repair) and the coverage check. Returns the rules and the readiness check.
async fn start_rules(
    config: &NetworkSettings,
    port: u16,
    pods: &Arc<PodStore>,
    metrics: &Arc<Metrics>,
    background: &mut JoinSet<()>,
) -> Result<(NodeRules, Box<dyn Fn() -> bool + Send + Sync>), StartupError> {
    let targets: Vec<SocketAddr> = config
        .host_ip
        .into_iter()
        .chain(config.host_ipv6.map(IpAddr::V6))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    let rules = NodeRules::prepare(&targets, config.iptables_backend)
        .await
        .map_err(|e| StartupError::Netfilter(e.to_string()))?;
    let (state, watching) = watch::channel(RulesState::Waiting("starting".into()));
    background.spawn(
        RuleKeeper {
            rules: rules.clone(),
            setting: config.host_interface.clone(),
            cni_conf_dir: config.cni_conf_dir.clone(),
            sync_period: config.iptables_sync_period,
            metrics: metrics.clone(),
            state,
        }
        .run(),
    );
    let probes = {
        let pods = pods.clone();
        move || {
            pods.read(|index| {
                index
                    .pods()
                    .flat_map(|pod| {
                        pod.ips.iter().map(|ip| Probe { uid: pod.uid.clone(), pod: pod.qualified_name(), ip: *ip })
                    })
                    .collect()
            })
        }
    };
    background.spawn(crate::netfilter::coverage::run(
        watching.clone(),
        probes,
        metrics.pods_not_intercepted.clone(),
        config.iptables_sync_period,
    ));
    let ready = move || matches!(*watching.borrow(), RulesState::InPlace(_));
    Ok((rules, Box::new(ready)))
}

/// Looks up the agent's controller (its DaemonSet) while the pod surely exists, retrying
/// while the API server cannot be reached; shutdown asks again if this never succeeded.
async fn find_controller(kube: kube::Client, pod: SelfPod, found: Arc<OnceLock<Controller>>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match crate::cluster::placement::controller(&kube, &pod).await {
            Ok(controller) => {
                tracing::debug!(?controller, "found the agent's controller");
                let _ = found.set(controller);
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read the agent's own pod yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
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
