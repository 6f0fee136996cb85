//! `--bind-pod-ports`: each pod's addresses bound, in the kernel, to the port the CNI gave it.
//!
//! The DNAT tells iamlet a request's source address, and iamlet knows pods by address. On a
//! bridge, a pod holding `CAP_NET_RAW` (which containerd grants every container) can claim
//! another pod's address: ARP to the node to take over its neighbour entry, or a frame with
//! the victim's MAC to take over the bridge's forwarding entry, then TCP from the victim's
//! address. kube2iam and kiam answer it with the victim's credentials. Here the kernel drops
//! such frames before they reach the bridge's learning or the IP stack ([`ruleset`]), from the
//! CNI's own records of each pod's port ([`crate::ports`]), which no pod can write.
//!
//! [`Binder`] owns the tables: installed before the DNAT (so no answer ever precedes the
//! binding), refilled as records come and go, checked and repaired with the other rules,
//! kept or removed with them.

pub mod listing;
pub mod nft;
pub mod ruleset;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};

pub use nft::{Nft, NftError};
use ruleset::{Elements, Layout, NodeIdentity};

use super::interfaces::InterfaceMatch;
use crate::cluster::{PodEvents, PodStore, Reason, Synced};
use crate::metrics::{Metrics, SpoofLabels};
use crate::ports::{PortIndex, Ports, Verdict, records};

/// `--bind-pod-ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindPodPorts {
    /// Bind wherever the CNI leaves records iamlet can read; off, with a warning, elsewhere.
    Auto,
    /// Bind; a pod without a record is refused.
    Always,
    /// Today's kube2iam behaviour: a pod is known by its address alone.
    Never,
}

impl BindPodPorts {
    /// `auto`, or a Go-style boolean (`true`, `false`, `1`, `0`, `t`, `f`).
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match super::lifecycle::auto_or_bool(text)? {
            None => Self::Auto,
            Some(true) => Self::Always,
            Some(false) => Self::Never,
        })
    }
}

/// The binding's flags.
#[derive(Debug, Clone)]
pub struct BindingSettings {
    pub bind_pod_ports: BindPodPorts,
    /// libcni's result cache, mounted read-only (`--cni-results-dir`).
    pub cni_results_dir: PathBuf,
}

const RISK: &str = "a pod with CAP_NET_RAW on a bridge CNI can claim another pod's address (ARP, or a forged source) \
                    and get that pod's role";

/// What a node's binding needs from the agent: its pods (the `auto` check and the unbound
/// report), where to report unbound pods, the view the metadata API checks, metrics.
#[derive(Clone)]
pub struct BindingPlan {
    pub settings: BindingSettings,
    pub pods: Arc<PodStore>,
    pub events: PodEvents,
    pub ports: Ports,
    pub metrics: Arc<Metrics>,
    pub sync_period: Duration,
    /// Whether this agent keeps the rules: false while a successor takes over (it keeps
    /// them then), so two agents never undo each other's work.
    pub holds: watch::Receiver<bool>,
}

impl BindingPlan {
    /// Whether to bind on this node: `Never` says so with the risk; `Auto` binds if nftables
    /// can be used and the records directory can be read (and, once the pod cache has synced,
    /// gives up if the node runs pods of which none has a record: see [`Binder::follow`]).
    pub async fn decide(&self, interfaces: &InterfaceMatch, nft: &Nft) -> Option<Binder> {
        let dir = &self.settings.cni_results_dir;
        let off = |why: String| {
            tracing::warn!("pod ports are not bound: {why}; {RISK}");
            None
        };
        match self.settings.bind_pod_ports {
            BindPodPorts::Never => return off("--bind-pod-ports=false".into()),
            BindPodPorts::Auto => {
                if let Err(error) = nft.usable().await {
                    return off(format!("nftables cannot be used ({error})"));
                }
                if let Err(error) = std::fs::read_dir(dir) {
                    return off(format!(
                        "the CNI's records in {} cannot be read ({error}): mount libcni's result cache \
                         (--cni-results-dir), or set --bind-pod-ports=false to say this is meant",
                        dir.display()
                    ));
                }
            }
            BindPodPorts::Always => {}
        }
        let layout = Layout::of(interfaces, is_bridge);
        if !layout.shared.is_empty() {
            tracing::warn!(
                interfaces = ?layout.shared,
                "every pod's traffic arrives on one shared interface here (not a bridge, not one link per pod): \
                 pods behind it cannot be told apart by port and are not bound; {RISK}"
            );
        }
        if layout.families().is_empty() {
            return off(format!("--host-interface={interfaces} names no bridge and no per-pod links"));
        }
        tracing::info!(
            dir = %dir.display(), bridges = ?layout.bridges,
            routed = %layout.routed.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "binding each pod's addresses to its own port"
        );
        Some(Binder {
            nft: nft.clone(),
            plan: self.clone(),
            layout,
            applied: Mutex::new(Applied::default()),
            settled: Synced::default(),
        })
    }
}

/// Whether `name` is a Linux bridge (sysfs has its `bridge` directory).
fn is_bridge(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

#[derive(Default)]
struct Applied {
    /// `auto` gave up after the start ([`Binder::follow`]): nothing is installed any more.
    retired: bool,
    /// What the sets hold, once installed.
    elements: Option<Elements>,
    /// Each kernel counter's packets at the last look, by (family, counter).
    counted: BTreeMap<(String, String), u64>,
    /// The ports the ingress table hooks, once installed.
    ingress: Option<Vec<String>>,
    /// Record files already said to be unusable.
    warned: std::collections::BTreeSet<String>,
}

/// The binding's tables on this node.
pub struct Binder {
    nft: Nft,
    plan: BindingPlan,
    layout: Layout,
    applied: Mutex<Applied>,
    /// Whether binding stays on: at once, or under `auto` once the pod cache has synced.
    settled: Synced,
}

impl Binder {
    /// Reads the records and replaces the tables with them, in one transaction; then the
    /// metadata API checks requests against them.
    pub async fn install(&self) -> Result<(), NftError> {
        let mut applied = self.applied.lock().await;
        if applied.retired {
            return Ok(());
        }
        let index = self.read(&mut applied);
        let elements = Elements::of(index.ports(), self.bridge_ports(), self.node_identity());
        self.nft.apply(&ruleset::install(&self.layout, &elements)).await?;
        applied.ingress = None;
        self.ingress(&mut applied, &elements).await?;
        applied.elements = Some(elements);
        applied.counted.clear();
        self.plan.ports.publish(Some(Arc::new(index)));
        Ok(())
    }

    /// Reads the records again and refills the sets if they changed (once installed).
    pub async fn refresh(&self) -> Result<(), NftError> {
        let mut applied = self.applied.lock().await;
        if applied.retired {
            return Ok(());
        }
        let index = self.read(&mut applied);
        let Some(current) = &applied.elements else { return Ok(()) };
        let elements = Elements::of(index.ports(), self.bridge_ports(), self.node_identity());
        if *current != elements {
            self.nft.apply(&ruleset::fill(&self.layout, &elements)).await?;
            self.ingress(&mut applied, &elements).await?;
            applied.elements = Some(elements);
        }
        self.plan.ports.publish(Some(Arc::new(index)));
        Ok(())
    }

    /// Rebuilds the pod bridges' ingress table ([`ruleset::ingress`]) when their ports changed.
    /// A port gone between the listing and the transaction fails it: read again, once.
    async fn ingress(&self, applied: &mut Applied, elements: &Elements) -> Result<(), NftError> {
        if self.layout.bridges.is_empty() || applied.ingress.as_ref() == Some(&elements.bridge_ports) {
            return Ok(());
        }
        let mut ports = elements.bridge_ports.clone();
        if self.nft.apply(&ruleset::ingress(&ports)).await.is_err() {
            ports = self.bridge_ports();
            ports.sort();
            self.nft.apply(&ruleset::ingress(&ports)).await?;
        }
        applied.ingress = Some(ports);
        Ok(())
    }

    /// Checks that the tables hold exactly the chains and elements installed, reinstalling
    /// them otherwise, and brings the spoofed-packet counters up to date. Returns whether it
    /// repaired anything.
    pub async fn reconcile(&self) -> Result<bool, NftError> {
        let drifted = {
            let mut applied = self.applied.lock().await;
            let Some(elements) = applied.elements.clone() else { return Ok(false) };
            let expected = ruleset::sets(&self.layout, &elements);
            let mut drifted = false;
            for family in self.layout.families() {
                let Some(listing) = self.nft.list(family).await? else {
                    drifted = true;
                    continue;
                };
                self.count(&mut applied, family, &listing.counters);
                let sets_match = expected
                    .iter()
                    .filter(|(f, _, _)| *f == family)
                    .all(|(_, set, items)| listing.sets.get(*set) == Some(items));
                let rules = match family {
                    "netdev" if applied.ingress.as_ref().is_some_and(Vec::is_empty) => 0,
                    _ => ruleset::rule_count(family, &self.layout),
                };
                if listing.rules != rules || !sets_match {
                    drifted = true;
                }
            }
            drifted
        };
        if drifted {
            tracing::warn!("iamlet's pod port binding was changed or removed; repairing");
            self.install().await?;
        }
        Ok(drifted)
    }

    /// Adds what each kernel counter counted since the last look (all of it after a reset).
    fn count(&self, applied: &mut Applied, family: &str, counters: &BTreeMap<String, u64>) {
        for (label, name) in ruleset::COUNTERS {
            let Some(now) = counters.get(name).copied() else { continue };
            let last = applied.counted.insert((family.to_string(), name.to_string()), now).unwrap_or(0);
            let added = if now >= last { now - last } else { now };
            if added > 0 {
                self.plan.metrics.spoofed_packets.get_or_create(&SpoofLabels { family: label }).inc_by(added);
            }
        }
    }

    /// The ports the pod bridges have now (sysfs `brif`): a pod's veth is there before the
    /// CNI's record is written, so it is checked from its first frame.
    fn bridge_ports(&self) -> Vec<String> {
        let mut ports = Vec::new();
        for bridge in &self.layout.bridges {
            let dir = std::path::Path::new("/sys/class/net").join(bridge).join("brif");
            match std::fs::read_dir(&dir) {
                Ok(entries) => ports.extend(
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| crate::ports::record::valid_interface_name(name)),
                ),
                Err(error) => tracing::warn!(bridge, %error, "cannot list the bridge's ports"),
            }
        }
        ports
    }

    /// The pod bridges' own MACs (sysfs) and addresses (`getifaddrs`): the pods' gateway.
    fn node_identity(&self) -> NodeIdentity {
        let mut node = NodeIdentity::default();
        for bridge in &self.layout.bridges {
            let address = std::path::Path::new("/sys/class/net").join(bridge).join("address");
            if let Some(mac) = std::fs::read_to_string(address).ok().and_then(|text| text.trim().parse().ok()) {
                node.macs.push(mac);
            }
        }
        if let Ok(addresses) = nix::ifaddrs::getifaddrs() {
            for address in addresses.filter(|a| self.layout.bridges.contains(&a.interface_name)) {
                let Some(storage) = address.address else { continue };
                if let Some(v4) = storage.as_sockaddr_in() {
                    node.ips.push(std::net::IpAddr::V4(v4.ip()));
                } else if let Some(v6) = storage.as_sockaddr_in6() {
                    node.ips.push(std::net::IpAddr::V6(v6.ip()));
                }
            }
        }
        node.macs.sort();
        node.macs.dedup();
        node.ips.sort();
        node.ips.dedup();
        node
    }

    fn read(&self, applied: &mut Applied) -> PortIndex {
        let dir = &self.plan.settings.cni_results_dir;
        match records::read(dir) {
            Ok(read) => {
                for (file, why) in read.unusable {
                    if applied.warned.insert(file.clone()) {
                        tracing::warn!(dir = %dir.display(), file, %why, "a CNI record binds no port");
                    }
                }
                if !read.index.superseded.is_empty() {
                    tracing::debug!(files = ?read.index.superseded, "CNI records superseded by newer ones");
                }
                read.index
            }
            Err(error) => {
                // Fail closed: no record, no binding; every pod is refused until they are back.
                tracing::error!(dir = %dir.display(), %error, "cannot read the CNI's records: no pod is bound");
                PortIndex::default()
            }
        }
    }

    /// Follows the records: refills the sets on every change (inotify, and every sync
    /// period), and keeps `iamlet_pods_unbound` and the pods' Warning Events current.
    ///
    /// Under `auto`, once the pod cache has synced: if the node runs pods and none of them has
    /// a record, the container runtime here leaves none, and binding would refuse every pod;
    /// the binding is then removed, with a warning saying why.
    pub async fn follow(self: Arc<Self>) {
        let (tx, mut changed) = mpsc::channel(1);
        let dir = self.plan.settings.cni_results_dir.clone();
        let links = tokio::spawn(watch_links(tx.clone()));
        let watcher = tokio::spawn(records::watch(dir, self.plan.sync_period, tx));
        let mut unbound = std::collections::BTreeSet::new();
        let mut checked = self.plan.settings.bind_pod_ports != BindPodPorts::Auto;
        if checked {
            self.settled.mark();
        }
        let synced = self.plan.pods.synced().wait();
        tokio::pin!(synced);
        loop {
            tokio::select! {
                _ = &mut synced, if !checked => {
                    checked = true;
                    let retire = self.runtime_leaves_no_record();
                    if let Some(why) = &retire {
                        self.retire(why).await;
                    }
                    self.settled.mark();
                    if retire.is_some() {
                        break;
                    }
                }
                change = changed.recv() => {
                    if change.is_none() {
                        break;
                    }
                    if !*self.plan.holds.borrow() {
                        continue;
                    }
                    if let Err(error) = self.refresh().await {
                        self.plan.metrics.iptables_errors.inc();
                        tracing::error!(%error, "cannot update the pod port binding");
                    }
                    unbound = self.report_unbound(unbound);
                }
            }
        }
        watcher.abort();
        links.abort();
    }

    /// Resolves once it is settled whether binding stays on (under `auto`, once the pod cache
    /// has synced): the rules are reported in place only then, so no pod is dropped by a
    /// binding about to be removed once the node says it is ready.
    pub async fn settled(&self) {
        self.settled.wait().await;
    }

    pub fn is_settled(&self) -> bool {
        self.settled.is_synced()
    }

    /// Why the runtime seems to leave no record: the node runs pods, none of them recorded.
    fn runtime_leaves_no_record(&self) -> Option<String> {
        let dir = &self.plan.settings.cni_results_dir;
        let index = records::read(dir).map(|read| read.index).unwrap_or_default();
        let pods: Vec<_> = self.plan.pods.read(|pods| pods.pods().cloned().collect());
        let recorded = pods.iter().any(|pod| pod.ips.iter().any(|ip| index.owner(ip).is_some()));
        (!pods.is_empty() && !recorded).then(|| {
            format!(
                "none of this node's {} pods has a record in {}: the container runtime here leaves none \
                 (containerd and CRI-O do)",
                pods.len(),
                dir.display()
            )
        })
    }

    /// Turns the binding off for good (`auto` found it cannot work here): the tables go, and
    /// requests are no longer checked against records.
    async fn retire(&self, why: &str) {
        let mut applied = self.applied.lock().await;
        applied.retired = true;
        applied.elements = None;
        tracing::warn!("pod ports are not bound: {why}; {RISK}");
        if let Err(error) = remove(&self.nft).await {
            tracing::error!(%error, "cannot remove the pod port binding");
        }
        self.plan.ports.publish(None);
        self.plan.metrics.pods_unbound.set(0);
    }

    /// Counts the pods refused for want of a port, and reports each once (again only after it
    /// was bound in between).
    fn report_unbound(&self, before: std::collections::BTreeSet<String>) -> std::collections::BTreeSet<String> {
        let pods: Vec<_> = self.plan.pods.read(|index| index.pods().cloned().collect());
        let mut now = std::collections::BTreeSet::new();
        for pod in pods.iter().filter(|pod| pod.owns_its_ips()) {
            let why = pod.ips.iter().find_map(|ip| match self.plan.ports.verdict(pod, ip) {
                Verdict::Bound => None,
                Verdict::Unbound(why) => Some(why),
            });
            let Some(why) = why else { continue };
            if !before.contains(&pod.uid) {
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, %why, "pod refused: its port is not bound");
                self.plan.events.report(pod, Reason::Unbound, format!("refused: {why}"));
            }
            now.insert(pod.uid.clone());
        }
        self.plan.metrics.pods_unbound.set(now.len() as i64);
        now
    }
}

/// Sends `()` on `changed` for every link the node adds, changes or removes (a new pod's veth
/// joining a bridge): the pod bridges' ports are read again at once, not at the next sync.
async fn watch_links(changed: mpsc::Sender<()>) {
    use futures::StreamExt;
    let (connection, _, mut messages) = match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(%error, "cannot follow the node's links: bridge ports are read every sync period");
            return;
        }
    };
    let connection = tokio::spawn(connection);
    while messages.next().await.is_some() {
        if changed.send(()).await.is_err() {
            break;
        }
    }
    connection.abort();
}

/// Removes iamlet's binding tables from both families. Returns whether any was there.
pub async fn remove(nft: &Nft) -> Result<bool, NftError> {
    let mut present = Vec::new();
    for family in ["bridge", "netdev", "inet"] {
        if nft.list(family).await?.is_some() {
            present.push(family);
        }
    }
    if !present.is_empty() {
        nft.apply(&ruleset::remove(&present)).await?;
    }
    Ok(!present.is_empty())
}
