//! The agent's view of the cluster: the pod, namespace and ServiceAccount stores, each fed by
//! its watch, and the pod watch's health. Started once, by [`Caches::start`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::health::{self, WatchHealth};
use super::index::Change;
use super::namespaces::{NamespaceRules, NamespaceStore};
use super::pod::AnnotationKeys;
use super::service_accounts::ServiceAccountStore;
use super::store::PodStore;
use super::watch::{
    NamespaceSink, PodSink, Reresolve, ServiceAccountSink, watch_namespaces, watch_pods, watch_service_accounts,
};
use crate::metrics::Metrics;

/// What the caches keep, and for how long the pod watch may fail before the agent is not
/// ready.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// The annotations kept of each pod (and ServiceAccount).
    pub keys: AnnotationKeys,
    /// How namespaces are read, with `--namespace-restrictions`.
    pub namespace_rules: Option<NamespaceRules>,
    /// `--service-account-roles`: keep the role each ServiceAccount names.
    pub service_account_roles: bool,
    /// `--pod-watch-stale-after`.
    pub pod_watch_stale_after: Duration,
}

/// The stores, as their watches keep them.
pub struct Caches {
    pub pods: Arc<PodStore>,
    /// With `--namespace-restrictions`.
    pub namespaces: Option<Arc<NamespaceStore>>,
    /// With `--service-account-roles`.
    pub service_accounts: Option<Arc<ServiceAccountStore>>,
    /// Whether the pod watch's view is current (stale for no longer than
    /// `--pod-watch-stale-after`): a readiness condition.
    pub pod_watch_current: watch::Receiver<bool>,
}

impl Caches {
    /// Starts the watches of `node`'s pods (and, as `settings` say, of namespaces and
    /// ServiceAccounts) in `tasks`. Every change to a pod, or to what it resolves to, goes
    /// to `changes` (the prefetcher's feed).
    pub fn start(
        kube: &kube::Client,
        node: &str,
        settings: CacheSettings,
        metrics: &Arc<Metrics>,
        changes: mpsc::UnboundedSender<Change>,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let pods = PodStore::new();
        let service_accounts = settings.service_account_roles.then(|| {
            let store = ServiceAccountStore::new();
            let reresolve = Reresolve::new(pods.clone(), changes.clone());
            let sink = ServiceAccountSink::new(store.clone(), settings.keys.clone(), reresolve);
            tasks.spawn(watch_service_accounts(kube.clone(), sink, metrics.clone()));
            store
        });
        let namespaces = settings.namespace_rules.map(|rules| {
            let store = NamespaceStore::new();
            tasks.spawn(watch_namespaces(kube.clone(), NamespaceSink::new(store.clone(), rules), metrics.clone()));
            store
        });
        let health = Arc::new(WatchHealth::new(Instant::now()));
        let sink = PodSink::new(pods.clone(), settings.keys, changes, metrics.clone());
        let (client, node, watched) = (kube.clone(), node.to_string(), health.clone());
        tasks.spawn(async move { watch_pods(client, &node, sink, watched).await });
        let gauge = metrics.pod_watch_stale_seconds.clone();
        let pod_watch_current = health::follow(kube.clone(), health, settings.pod_watch_stale_after, gauge, tasks);
        Self { pods, namespaces, service_accounts, pod_watch_current }
    }
}
