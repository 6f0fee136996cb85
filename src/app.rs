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
use crate::cli::{BaseArnSource, Config, DefaultRoleSource};
use crate::cluster::health::WatchHealth;
use crate::cluster::placement::{Controller, SelfPod};
use crate::cluster::watch::{NamespaceSink, PodSink, watch_namespaces, watch_pods};
use crate::cluster::{AnnotationKeys, NamespaceRules, NamespaceStore, PodStore};
use crate::credentials::{AwsSts, CacheSettings, CredentialCache, Prefetcher, RoleAssumer};
use crate::imds::{ImdsService, TokenIssuer, UpstreamImds};
use crate::metrics::Metrics;
use crate::netfilter::coverage::Probe;
use crate::netfilter::lifecycle::{self, Decision, KeepOnExit};
use crate::netfilter::{NodeRules, RuleKeeper, RulesState};
use crate::policy::{BaseArn, Policy, RoleArn};
use crate::resolve::{Resolver, SessionRules};

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
    let kube = crate::cluster::client::client(&config).await?;
    let sts = AwsSts::from_environment(config.use_regional_sts_endpoint, config.sts_timeout).await.into_assumer();
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
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(UpstreamImds::new(config.metadata_authority.clone(), UPSTREAM_TIMEOUT));
    let policy = Arc::new(discover_policy(&config, &upstream, deps.sts.as_ref()).await?);
    tracing::info!(
        base_arn = policy.base.as_ref().map(BaseArn::as_str),
        default_role = policy.default_role.as_ref().map(RoleArn::as_str),
        node = %config.node,
        "policy ready"
    );

    let sessions = SessionRules::new(config.session_ttl);
    if let Some(requested) = sessions.lowered_from() {
        tracing::warn!(
            requested = %humantime::format_duration(requested),
            used = %humantime::format_duration(sessions.refresh_before()),
            "--iam-role-session-ttl is lowered: STS caps role-chained sessions (an instance profile's, IRSA's) at 1h \
             and sessions last twice the TTL; credentials are refreshed with this much left"
        );
    }
    let overreach = config.allow_route.overreach();
    if !overreach.is_empty() {
        tracing::warn!(
            paths = %overreach.join(", "),
            "--allow-route-regexp matches paths that iamlet never relays (they identify or empower the node); \
             they stay refused"
        );
    }
    let bind_ip = config.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let app_listener = bind("--app-port", SocketAddr::new(bind_ip, config.app_port)).await?;
    let app_addr = app_listener.local_addr().expect("a bound socket has an address");
    let mut app_listeners = vec![app_listener];
    if let Some(v6) = config.host_ipv6 {
        app_listeners.push(bind("--app-port", SocketAddr::new(IpAddr::V6(v6), app_addr.port())).await?);
    }
    let admin_listener = bind("--metrics-port", SocketAddr::new(bind_ip, config.metrics_port)).await?;
    let admin_addr = admin_listener.local_addr().expect("a bound socket has an address");

    let pods = PodStore::new();
    let namespaces = config.namespace_restrictions.map(|_| NamespaceStore::new());
    let credentials = CredentialCache::new(
        deps.sts,
        CacheSettings {
            sessions,
            error_ttl: config.error_ttl,
            sts_timeout: config.sts_timeout,
            capacity: 20_000,
            max_concurrent_sts: config.sts_concurrency.into(),
        },
        metrics.clone(),
    );

    let mut background = JoinSet::new();
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let sink = PodSink {
        store: pods.clone(),
        keys: AnnotationKeys {
            role: config.role_annotation.clone(),
            external_id: config.external_id_annotation.clone(),
        },
        changes: changes_tx,
        metrics: metrics.clone(),
        listing: Vec::new(),
    };
    let (kube, node) = (deps.kube.clone(), config.node.clone());
    let pod_watch = Arc::new(WatchHealth::new(std::time::Instant::now()));
    let health = pod_watch.clone();
    background.spawn(async move { watch_pods(kube, &node, sink, health).await });
    let confirm_every = (config.pod_watch_stale_after / 3).min(Duration::from_secs(10));
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
    if let (Some(store), Some(format)) = (&namespaces, config.namespace_restrictions) {
        let rules = NamespaceRules {
            annotation: config.namespace_annotation.clone(),
            format,
            base: policy.base.clone(),
            account: policy.account.clone(),
        };
        let sink = NamespaceSink { store: store.clone(), rules, listing: Vec::new() };
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

    let events = config.pod_events.then(|| {
        let (events, publisher) = crate::cluster::PodEvents::start(deps.kube.clone(), &config.node);
        background.spawn(publisher);
        events
    });
    let imds = Arc::new(ImdsService {
        pods: pods.clone(),
        resolver,
        credentials: credentials.clone(),
        tokens: TokenIssuer::new(),
        upstream,
        allow_route: config.allow_route.clone(),
        require_imdsv2: config.require_imdsv2,
        pod_wait: config.pod_wait,
        credential_wait: config.sts_timeout,
        node: config.node.clone(),
        metrics: metrics.clone(),
        events,
    });
    let mut checks: Vec<crate::admin::ReadinessCheck> = Vec::new();
    let stale_after = config.pod_watch_stale_after;
    checks.push((
        "pod watch failing for longer than --pod-watch-stale-after",
        Box::new(move || pod_watch.stale_for(std::time::Instant::now()) <= stale_after),
    ));
    let rules = match config.iptables {
        true => {
            let (rules, check) = start_rules(&config, app_addr.port(), &pods, &metrics, &mut background).await?;
            checks.push(("netfilter rules not in place", check));
            let pod = SelfPod::from_env();
            let controller = Arc::new(OnceLock::new());
            if let Some(pod) = pod.clone() {
                background.spawn(find_controller(deps.kube.clone(), pod, controller.clone()));
            }
            let (keep, kube, node) = (config.iptables_keep_on_exit, deps.kube.clone(), config.node.clone());
            Some(RulesOnExit { rules, keep, kube, node, pod, controller })
        }
        false => None,
    };
    let readiness = Arc::new(Readiness { pods: pods.clone(), namespaces: namespaces.clone(), checks });
    if let Some(taint) = config.startup_taint.clone() {
        let (readiness, kube, node) = (readiness.clone(), deps.kube.clone(), config.node.clone());
        background.spawn(async move {
            readiness.ready().await;
            crate::cluster::taint::remove(kube, &node, &taint).await;
        });
    }
    {
        let (upstream, metrics) = (imds.upstream.clone(), metrics.clone());
        background.spawn(async move { crate::imds::upstream::report_node_exposure(&upstream, &metrics).await });
    }
    let refusals = metrics.connections_refused.clone();
    let admin = Arc::new(AdminService { pods, namespaces, credentials, metrics, debug: config.debug, readiness });

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = JoinSet::new();
    let grace = config.shutdown_grace;
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
            config.connection_limits,
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
    config: &Config,
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

/// Resolves the base ARN and default role, asking the node's metadata service when told to.
pub(crate) async fn discover_policy(
    config: &Config,
    upstream: &UpstreamImds,
    sts: &dyn RoleAssumer,
) -> Result<Policy, StartupError> {
    let discovery = |flag, message| StartupError::Discovery { flag, message };
    let base = match &config.base_arn {
        BaseArnSource::None => None,
        BaseArnSource::Given(base) => Some(base.clone()),
        BaseArnSource::Discover => {
            let flag = "--auto-discover-base-arn";
            let base = node_profile_base(upstream).await.map_err(|message| discovery(flag, message))?;
            tracing::info!(base_arn = base.as_str(), "discovered the base role ARN");
            Some(base)
        }
    };
    let account = match (&base, config.namespace_restrictions) {
        (Some(base), _) => Some(base.account().to_string()),
        (None, None) => None,
        (None, Some(_)) => node_account(upstream, sts).await,
    };
    let mut policy = Policy { base, default_role: None, restrictions: config.namespace_restrictions, account };
    policy.default_role = match &config.default_role {
        DefaultRoleSource::None => None,
        DefaultRoleSource::Given(role) => Some(
            policy
                .role_from_annotation(role)
                .map_err(|denial| StartupError::Flag { flag: "--default-role", message: denial.to_string() })?,
        ),
        DefaultRoleSource::Discover => {
            let flag = "--auto-discover-default-role";
            let listing = upstream
                .get_text("/latest/meta-data/iam/security-credentials/")
                .await
                .map_err(|e| discovery(flag, e.to_string()))?;
            let name = listing.lines().next().map(str::trim).filter(|n| !n.is_empty());
            let name = name.ok_or_else(|| discovery(flag, "the node has no instance role".into()))?;
            let role = policy.role_from_annotation(name).map_err(|d| discovery(flag, d.to_string()))?;
            tracing::info!(default_role = role.as_str(), "discovered the default role");
            Some(role)
        }
    };
    Ok(policy)
}

/// The base ARN of the node's instance profile (IMDS `iam/info`): its partition and account.
async fn node_profile_base(upstream: &UpstreamImds) -> Result<BaseArn, String> {
    let info = upstream.get_text("/latest/meta-data/iam/info").await.map_err(|e| e.to_string())?;
    let profile = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("InstanceProfileArn")?.as_str().map(str::to_string))
        .ok_or("iam/info has no InstanceProfileArn: does the node have an instance profile?")?;
    BaseArn::from_instance_profile_arn(&profile).map_err(|e| e.to_string())
}

/// The node's account, which confines namespace entries that name none when there is no
/// base ARN: the instance profile's, else that of iamlet's own credentials. Without one,
/// such entries allow nothing.
async fn node_account(upstream: &UpstreamImds, sts: &dyn RoleAssumer) -> Option<String> {
    let account = match node_profile_base(upstream).await {
        Ok(base) => Ok(base.account().to_string()),
        Err(profile_error) => sts.own_account().await.map_err(|sts_error| format!("{profile_error}; {sts_error}")),
    };
    match account {
        Ok(account) => {
            tracing::info!(account, "namespace entries without an account are confined to this one");
            Some(account)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot tell the node's account: namespace entries without one allow nothing \
                (give --base-role-arn, or list full role ARNs)");
            None
        }
    }
}
