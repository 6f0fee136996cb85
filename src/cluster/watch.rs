//! The watches that feed the stores: pods on this node, namespaces, and ServiceAccounts.
//!
//! kube's `watcher` does the list-then-watch protocol, resumes from the last resourceVersion,
//! re-lists after 410 Gone, and backs off on errors; this module turns its events into store
//! updates, applying each full re-listing atomically so pods deleted while the watch was down
//! are removed too.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use super::health::WatchHealth;
use super::index::Change;
use super::namespaces::{NamespaceRules, NamespaceStore};
use super::pod::{AnnotationKeys, identity};
use super::service_accounts::{ServiceAccountStore, role_of};
use super::store::PodStore;
use crate::metrics::Metrics;
use crate::pod::PodIdentity;
use crate::policy::{NamespaceRule, ServiceAccountRole};

/// Where the events of one watch go.
pub trait WatchSink<K> {
    fn apply(&mut self, object: K);
    fn delete(&mut self, object: K);
    /// A (re-)listing starts: objects follow through `init_apply`.
    fn init(&mut self);
    /// One object of the listing. Sinks keep only what they need of it, so a listing of
    /// thousands of pods is never held as full objects.
    fn init_apply(&mut self, object: K);
    /// The listing is complete: everything not in it is gone.
    fn init_done(&mut self);
}

/// Drives `stream` into `sink` until the stream ends (it does not, in practice: the watcher
/// retries forever with back-off). Errors are logged and counted, never fatal.
pub async fn drive<K, S>(
    stream: S,
    sink: &mut impl WatchSink<K>,
    what: &'static str,
    metrics: &Metrics,
    health: &WatchHealth,
) where
    K: Debug,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut listed = 0usize;
    while let Some(event) = stream.next().await {
        match &event {
            Ok(_) => health.delivered(std::time::Instant::now()),
            Err(_) => health.failed(std::time::Instant::now()),
        }
        match event {
            Ok(watcher::Event::Init) => {
                listed = 0;
                sink.init();
            }
            Ok(watcher::Event::InitApply(object)) => {
                listed += 1;
                sink.init_apply(object);
            }
            Ok(watcher::Event::InitDone) => {
                tracing::info!(watch = what, count = listed, "watch (re)synchronised");
                sink.init_done();
            }
            Ok(watcher::Event::Apply(object)) => sink.apply(object),
            Ok(watcher::Event::Delete(object)) => sink.delete(object),
            Err(error) => {
                metrics.watch_errors.get_or_create(&crate::metrics::WatchLabels { watch: what }).inc();
                tracing::warn!(watch = what, %error, "watch failed; retrying with back-off");
            }
        }
    }
}

/// Feeds the pod store and reports changes (for prefetching and forgetting credentials).
pub struct PodSink {
    store: Arc<PodStore>,
    keys: AnnotationKeys,
    changes: mpsc::UnboundedSender<Change>,
    metrics: Arc<Metrics>,
    /// The listing under way.
    listing: Vec<PodIdentity>,
}

impl PodSink {
    /// Keeps of each pod what `keys` name, in `store`; every change goes to `changes`.
    pub fn new(
        store: Arc<PodStore>,
        keys: AnnotationKeys,
        changes: mpsc::UnboundedSender<Change>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { store, keys, changes, metrics, listing: Vec::new() }
    }

    fn publish(&self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            let _ = self.changes.send(change);
        }
        self.metrics.pods_indexed.set(self.store.read(|index| index.len()) as i64);
    }
}

impl WatchSink<Pod> for PodSink {
    fn apply(&mut self, pod: Pod) {
        let change = match identity(&pod, &self.keys) {
            Some(identity) => self.store.update(|index| index.upsert(identity)),
            // Finished or host-network now: it may have been indexed before.
            None => self.store.update(|index| index.remove(&pod.uid().unwrap_or_default())),
        };
        self.publish(change);
    }

    fn delete(&mut self, pod: Pod) {
        let change = self.store.update(|index| index.remove(&pod.uid().unwrap_or_default()));
        self.publish(change);
    }

    fn init(&mut self) {
        self.listing.clear();
    }

    fn init_apply(&mut self, pod: Pod) {
        self.listing.extend(identity(&pod, &self.keys));
    }

    fn init_done(&mut self) {
        let changes = self.store.replace_all(std::mem::take(&mut self.listing));
        self.publish(changes);
    }
}

/// Feeds the namespace store.
pub struct NamespaceSink {
    store: Arc<NamespaceStore>,
    rules: NamespaceRules,
    /// The listing under way: annotated namespaces and their rules.
    listing: Vec<(String, NamespaceRule)>,
}

impl NamespaceSink {
    /// Compiles each namespace's annotation with `rules` into `store`.
    pub fn new(store: Arc<NamespaceStore>, rules: NamespaceRules) -> Self {
        Self { store, rules, listing: Vec::new() }
    }
}

impl WatchSink<Namespace> for NamespaceSink {
    fn apply(&mut self, namespace: Namespace) {
        self.store.set(&namespace.name_any(), self.rules.rule_of(&namespace));
    }

    fn delete(&mut self, namespace: Namespace) {
        self.store.set(&namespace.name_any(), None);
    }

    fn init(&mut self) {
        self.listing.clear();
    }

    fn init_apply(&mut self, namespace: Namespace) {
        if let Some(rule) = self.rules.rule_of(&namespace) {
            self.listing.push((namespace.name_any(), rule));
        }
    }

    fn init_done(&mut self) {
        self.store.replace_all(std::mem::take(&mut self.listing));
    }
}

/// Tells the prefetcher that pods must be resolved again: something they depend on besides
/// themselves (their ServiceAccount's role) changed. It then prefetches the new role's
/// credentials and forgets the old ones, exactly as when the pod's own annotation changes.
#[derive(Clone)]
pub struct Reresolve {
    pods: Arc<PodStore>,
    changes: mpsc::UnboundedSender<Change>,
}

impl Reresolve {
    pub fn new(pods: Arc<PodStore>, changes: mpsc::UnboundedSender<Change>) -> Self {
        Self { pods, changes }
    }

    /// Announces again every pod of this node that `affected` selects.
    fn pods_where(&self, affected: impl Fn(&PodIdentity) -> bool) {
        let pods: Vec<Arc<PodIdentity>> =
            self.pods.read(|index| index.pods().filter(|p| affected(p)).cloned().collect());
        for pod in pods {
            let _ = self.changes.send(Change::Reresolve(pod));
        }
    }
}

/// Feeds the ServiceAccount store from a metadata-only watch (annotations are all it needs),
/// and has the pods of a ServiceAccount whose role changed resolved again.
pub struct ServiceAccountSink {
    store: Arc<ServiceAccountStore>,
    keys: AnnotationKeys,
    reresolve: Reresolve,
    /// The listing under way: ServiceAccounts that name a role.
    listing: Vec<((String, String), ServiceAccountRole)>,
}

impl ServiceAccountSink {
    /// Reads each ServiceAccount's role with `keys` (the pods' `--iam-role-key` and
    /// `--iam-external-id`) into `store`.
    pub fn new(store: Arc<ServiceAccountStore>, keys: AnnotationKeys, reresolve: Reresolve) -> Self {
        Self { store, keys, reresolve, listing: Vec::new() }
    }

    fn changed(&self, changed: &[(String, String)]) {
        if !changed.is_empty() {
            self.reresolve.pods_where(|pod| {
                pod.own_role().is_none()
                    && changed.iter().any(|(ns, name)| *ns == pod.namespace && *name == pod.service_account)
            });
        }
    }
}

type ServiceAccountMeta = PartialObjectMeta<ServiceAccount>;

fn namespace_and_name(account: &ServiceAccountMeta) -> (String, String) {
    (account.namespace().unwrap_or_default(), account.name_any())
}

impl WatchSink<ServiceAccountMeta> for ServiceAccountSink {
    fn apply(&mut self, account: ServiceAccountMeta) {
        let name = namespace_and_name(&account);
        if self.store.set(&name.0, &name.1, role_of(&account.metadata, &self.keys)) {
            tracing::info!(service_account = %format!("{}/{}", name.0, name.1), "ServiceAccount role changed");
            self.changed(&[name]);
        }
    }

    fn delete(&mut self, account: ServiceAccountMeta) {
        let name = namespace_and_name(&account);
        if self.store.set(&name.0, &name.1, None) {
            self.changed(&[name]);
        }
    }

    fn init(&mut self) {
        self.listing.clear();
    }

    fn init_apply(&mut self, account: ServiceAccountMeta) {
        if let Some(role) = role_of(&account.metadata, &self.keys) {
            self.listing.push((namespace_and_name(&account), role));
        }
    }

    fn init_done(&mut self) {
        let first = !self.store.synced().is_synced();
        let changed = self.store.replace_all(std::mem::take(&mut self.listing));
        if first {
            // Pods seen before the first listing could not be resolved ("not synced"): all of
            // them without their own role get their answer now, role or default.
            self.reresolve.pods_where(|pod| pod.own_role().is_none());
        } else {
            self.changed(&changed);
        }
    }
}

/// Watches the pods scheduled to `node` (a field selector, so each agent sees its own node's
/// pods only, not the whole cluster's as kube2iam does).
pub async fn watch_pods(client: Client, node: &str, mut sink: PodSink, health: Arc<WatchHealth>) {
    let metrics = sink.metrics.clone();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher(Api::<Pod>::all(client), config).default_backoff();
    drive(stream, &mut sink, "pods", &metrics, &health).await;
}

/// Watches every namespace, for their allow lists.
pub async fn watch_namespaces(client: Client, mut sink: NamespaceSink, metrics: Arc<Metrics>) {
    let stream = watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    drive(stream, &mut sink, "namespaces", &metrics, &WatchHealth::new(std::time::Instant::now())).await;
}

/// Watches every ServiceAccount's metadata, for the roles they name.
pub async fn watch_service_accounts(client: Client, mut sink: ServiceAccountSink, metrics: Arc<Metrics>) {
    let accounts = Api::<ServiceAccountMeta>::all(client);
    let stream = watcher(accounts, watcher::Config::default()).default_backoff();
    drive(stream, &mut sink, "serviceaccounts", &metrics, &WatchHealth::new(std::time::Instant::now())).await;
}

/// The sinks fed watch events directly, as kube's watcher delivers them, with no API server:
/// listings (`Init`, `InitApply`, `InitDone`) applied whole, updates and deletions, and what
/// each announces to the prefetcher.
#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::{RestrictionFormat, ServiceAccountLookup};

    fn pod(name: &str, ip: &str, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    fn account(name: &str, annotations: serde_json::Value) -> ServiceAccountMeta {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        }))
        .unwrap()
    }

    /// What the sink announced since the last call: `(kind, pod name)`.
    fn announced(changes: &mut mpsc::UnboundedReceiver<Change>) -> Vec<(&'static str, String)> {
        std::iter::from_fn(|| changes.try_recv().ok())
            .map(|change| match change {
                Change::Upserted(pod) => ("upserted", pod.name.clone()),
                Change::Removed(pod) => ("removed", pod.name.clone()),
                Change::Reresolve(pod) => ("reresolve", pod.name.clone()),
            })
            .collect()
    }

    fn pod_sink() -> (PodSink, Arc<PodStore>, mpsc::UnboundedReceiver<Change>) {
        let (store, (changes, announced)) = (PodStore::new(), mpsc::unbounded_channel());
        let sink = PodSink::new(store.clone(), AnnotationKeys::default(), changes, Arc::new(Metrics::new()));
        (sink, store, announced)
    }

    #[test]
    fn a_pod_listing_is_applied_whole_and_a_relisting_removes_what_went_while_down() {
        let (mut sink, store, mut changes) = pod_sink();
        sink.init();
        sink.init_apply(pod("web", "10.0.0.1", json!({"iam.amazonaws.com/role": "app"})));
        sink.init_apply(pod("batch", "10.0.0.2", json!({})));
        assert!(!store.synced().is_synced() && store.lookup(&"10.0.0.1".parse().unwrap()).is_none(), "not yet");
        sink.init_done();
        assert!(store.synced().is_synced());
        assert_eq!(store.lookup(&"10.0.0.1".parse().unwrap()).unwrap().role_annotation.as_deref(), Some("app"));
        let mut first = announced(&mut changes);
        first.sort();
        assert_eq!(first, [("upserted", "batch".into()), ("upserted", "web".into())]);

        sink.apply(pod("web", "10.0.0.1", json!({"iam.amazonaws.com/role": "admin"})));
        assert_eq!(announced(&mut changes), [("upserted", "web".into())]);
        sink.delete(pod("web", "10.0.0.1", json!({})));
        assert_eq!(announced(&mut changes), [("removed", "web".into())]);
        assert!(store.lookup(&"10.0.0.1".parse().unwrap()).is_none());

        // The watch was down while batch was deleted: the re-listing says so.
        sink.init();
        sink.init_apply(pod("api", "10.0.0.3", json!({})));
        sink.init_done();
        let mut relisted = announced(&mut changes);
        relisted.sort();
        assert_eq!(relisted, [("removed", "batch".into()), ("upserted", "api".into())]);
        assert_eq!(store.read(|index| index.len()), 1);
    }

    #[test]
    fn a_serviceaccount_role_change_reannounces_its_pods_once_listed_and_never_a_departed_one() {
        let (mut pods, pod_store, mut changes) = pod_sink();
        pods.init();
        pods.init_apply(pod("web", "10.0.0.1", json!({})));
        pods.init_apply(pod("own", "10.0.0.2", json!({"iam.amazonaws.com/role": "own"})));
        pods.init_done();
        announced(&mut changes);
        let store = ServiceAccountStore::new();
        let reresolve = Reresolve::new(pod_store.clone(), pods.changes.clone());
        let mut sink = ServiceAccountSink::new(store.clone(), AnnotationKeys::default(), reresolve);

        sink.init();
        sink.init_apply(account("web", json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/a"})));
        sink.init_done();
        assert!(store.synced().is_synced());
        // The first listing answers every pod that waited for it: those without a role of their own.
        assert_eq!(announced(&mut changes), [("reresolve", "web".into())]);

        sink.apply(account("web", json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/a"})));
        assert!(announced(&mut changes).is_empty(), "nothing changed, nothing announced");
        sink.apply(account("web", json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/b"})));
        assert_eq!(announced(&mut changes), [("reresolve", "web".into())]);

        // The pod leaves; its ServiceAccount's later changes announce nothing of it.
        pods.delete(pod("web", "10.0.0.1", json!({})));
        assert_eq!(announced(&mut changes), [("removed", "web".into())]);
        sink.delete(account("web", json!({})));
        assert!(announced(&mut changes).is_empty(), "no re-announcement of a departed pod");
        assert!(
            store.entry("shop", "web").is_some_and(|entry| matches!(entry.as_lookup(), ServiceAccountLookup::NoRole))
        );
    }

    #[test]
    fn namespace_rules_follow_listings_updates_and_deletions() {
        let store = NamespaceStore::new();
        let rules = NamespaceRules {
            annotation: "iam.amazonaws.com/allowed-roles".into(),
            format: RestrictionFormat::Glob,
            base: None,
            account: Some("123456789012".into()),
        };
        let namespace = |name: &str, annotations: serde_json::Value| -> Namespace {
            serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}})).unwrap()
        };
        let mut sink = NamespaceSink::new(store.clone(), rules);
        sink.init();
        sink.init_apply(namespace("shop", json!({"iam.amazonaws.com/allowed-roles": "[\"app-*\"]"})));
        sink.init_apply(namespace("plain", json!({})));
        assert!(!store.synced().is_synced());
        sink.init_done();
        assert!(store.synced().is_synced() && store.rule("shop").is_some() && store.rule("plain").is_none());
        sink.apply(namespace("plain", json!({"iam.amazonaws.com/allowed-roles": "[\"x\"]"})));
        assert!(store.rule("plain").is_some());
        sink.delete(namespace("shop", json!({})));
        assert!(store.rule("shop").is_none());
        sink.init();
        sink.init_done();
        assert!(store.snapshot().is_empty(), "an empty re-listing leaves nothing");
    }
}
