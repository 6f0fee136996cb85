//! iamlet's rules for the agent's lifetime: prepared at start (failing fast without iptables
//! or the capability), kept and checked while it runs, kept or removed when it stops.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::binding::BindingPlan;
use super::coverage::{Probe, Uncovered};
use super::interfaces::InterfaceMatch;
use super::lifecycle::{self, Decision, KeepOnExit};
use super::{IptablesError, NetworkSettings, NodeRules, RuleKeeper, RulesState};
use crate::cluster::placement::{Controller, SelfPod};
use crate::cluster::{PodEvents, PodStore, Reason};
use crate::metrics::Metrics;
use crate::ports::Ports;

/// What the rules need of the cluster: the API server (whether the agent's DaemonSet goes on,
/// at stop), this node's name, its pods (the coverage check), and where to report the pods
/// the rules miss.
pub struct NodeCluster<'a> {
    pub kube: &'a kube::Client,
    pub node: &'a str,
    pub pods: &'a Arc<PodStore>,
    pub events: &'a PodEvents,
    /// What the metadata API checks each request's pod against (`--bind-pod-ports`).
    pub ports: &'a Ports,
}

/// Prepares the rules and starts the tasks that own them (see [`start_rules`]), and, under
/// `--iptables-keep-on-exit=auto`, the lookup of the agent's DaemonSet that decides their
/// fate on stop. The tasks check and repair the rules while `holds` says this agent keeps
/// them (a successor taking over keeps them otherwise). Returns what stop needs, and the
/// rules' state (a readiness condition: [`RulesState::is_in_place`]).
pub async fn guard(
    settings: &NetworkSettings,
    port: u16,
    cluster: NodeCluster<'_>,
    holds: watch::Receiver<bool>,
    metrics: &Arc<Metrics>,
    background: &mut JoinSet<()>,
) -> Result<(RulesOnExit, watch::Receiver<RulesState>), IptablesError> {
    let NodeCluster { kube, node, pods, events, ports } = cluster;
    let binding = BindingPlan {
        settings: settings.binding.clone(),
        pods: pods.clone(),
        events: events.clone(),
        ports: ports.clone(),
        metrics: metrics.clone(),
        sync_period: settings.iptables_sync_period,
        holds,
    };
    let (rules, in_place) = start_rules(settings, port, binding, metrics, background).await?;
    let pod = SelfPod::from_env();
    let controller = Arc::new(OnceLock::new());
    if let Some(pod) = pod.clone() {
        background.spawn(find_controller(kube.clone(), pod, controller.clone()));
    }
    let keep = settings.iptables_keep_on_exit;
    Ok((RulesOnExit { rules, keep, kube: kube.clone(), node: node.to_string(), pod, controller }, in_place))
}

/// What [`RunningAgent::stop`] needs to keep or remove the rules (`--iptables-keep-on-exit`).
pub struct RulesOnExit {
    rules: NodeRules,
    keep: KeepOnExit,
    kube: kube::Client,
    node: String,
    pod: Option<SelfPod>,
    /// The agent's controller, looked up at startup.
    controller: Arc<OnceLock<Controller>>,
}

impl RulesOnExit {
    /// Keeps or removes the rules, as `--iptables-keep-on-exit` and the agent's DaemonSet say;
    /// an agent that handed over to a successor keeps them, whatever they say: they are the
    /// successor's.
    pub async fn finish(self, handed_over: bool) {
        if handed_over {
            tracing::info!("keeping iamlet's rules: the successor keeps them now");
            return;
        }
        let placement = match self.keep {
            KeepOnExit::Auto => {
                let known = self.controller.get().cloned();
                Some(crate::cluster::placement::placement(&self.kube, self.pod.as_ref(), known, &self.node).await)
            }
            _ => None,
        };
        let decision = lifecycle::decide(self.keep, || placement.expect("asked under auto"));
        tracing::info!("{decision}");
        if let Decision::Remove(_) = decision {
            if let Err(error) = self.rules.remove().await {
                tracing::error!(%error, "could not remove iamlet's rules: run `iamlet cleanup` on this node");
            }
            match super::binding::remove(&super::binding::Nft::default()).await {
                Ok(true) => tracing::info!("removed iamlet's pod port binding"),
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "no pod port binding removed"),
            }
        }
    }
}

/// Prepares iamlet's rules for each family the agent has an address on (failing fast on a
/// missing iptables or capability), and starts the tasks that own them: the keeper (detect,
/// install, repair) and the coverage check, which records a Warning Event on each pod it
/// finds uncovered. Returns the rules and their state.
async fn start_rules(
    config: &NetworkSettings,
    port: u16,
    binding: BindingPlan,
    metrics: &Arc<Metrics>,
    background: &mut JoinSet<()>,
) -> Result<(NodeRules, watch::Receiver<RulesState>), IptablesError> {
    let targets: Vec<SocketAddr> = config
        .host_ip
        .into_iter()
        .chain(config.host_ipv6.map(IpAddr::V6))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    let rules = NodeRules::prepare(&targets, config.iptables_backend).await?;
    let (state, watching) = watch::channel(RulesState::Waiting("starting".into()));
    background.spawn(
        RuleKeeper {
            rules: rules.clone(),
            setting: config.host_interface.clone(),
            cni_conf_dir: config.cni_conf_dir.clone(),
            sync_period: config.iptables_sync_period,
            metrics: metrics.clone(),
            state,
            binding: binding.clone(),
        }
        .run(),
    );
    let BindingPlan { pods, events, .. } = binding;
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
    let report = {
        let (pods, events) = (pods.clone(), events.clone());
        move |uncovered: &Uncovered, interfaces: &InterfaceMatch| {
            let Some(pod) = pods.read(|index| index.pods().find(|pod| pod.uid == uncovered.uid).cloned()) else {
                return;
            };
            let note = format!(
                "this pod's metadata traffic arrives on {}, which iamlet's rules (--host-interface={interfaces}) do not \
                 intercept: it reaches the node's metadata service, and the node's role, directly. Fix \
                 --host-interface on iamlet's DaemonSet",
                uncovered.interface
            );
            events.report(&pod, Reason::NotIntercepted, note);
        }
    };
    background.spawn(super::coverage::run(
        watching.clone(),
        probes,
        report,
        metrics.pods_not_intercepted.clone(),
        config.iptables_sync_period,
    ));
    Ok((rules, watching))
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
