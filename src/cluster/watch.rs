//! The watches that feed the stores: pods on this node, and namespaces.
//!
//! kube's `watcher` does the list-then-watch protocol, resumes from the last resourceVersion,
//! re-lists after 410 Gone, and backs off on errors; this module turns its events into store
//! updates, applying each full re-listing atomically so pods deleted while the watch was down
//! are removed too.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use super::index::Change;
use super::namespaces::{NamespaceRules, NamespaceStore};
use super::pod::{AnnotationKeys, PodIdentity};
use super::store::PodStore;
use crate::metrics::Metrics;

/// Where the events of one watch go.
pub trait WatchSink<K> {
    fn apply(&mut self, object: K);
    fn delete(&mut self, object: K);
    /// A complete listing: everything not in it is gone.
    fn replace_all(&mut self, objects: Vec<K>);
}

/// Drives `stream` into `sink` until the stream ends (it does not, in practice: the watcher
/// retries forever with back-off). Errors are logged and counted, never fatal.
pub async fn drive<K, S>(stream: S, sink: &mut impl WatchSink<K>, what: &'static str, metrics: &Metrics)
where
    K: Debug,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut listing: Option<Vec<K>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(Vec::new()),
            Ok(watcher::Event::InitApply(object)) => listing.get_or_insert_with(Vec::new).push(object),
            Ok(watcher::Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                tracing::info!(watch = what, count = objects.len(), "watch (re)synchronised");
                sink.replace_all(objects);
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
    pub store: Arc<PodStore>,
    pub keys: AnnotationKeys,
    pub changes: mpsc::UnboundedSender<Change>,
    pub metrics: Arc<Metrics>,
}

impl PodSink {
    fn publish(&self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            let _ = self.changes.send(change);
        }
        self.metrics.pods_indexed.set(self.store.read(|index| index.len()) as i64);
    }
}

impl WatchSink<Pod> for PodSink {
    fn apply(&mut self, pod: Pod) {
        let change = match PodIdentity::from_pod(&pod, &self.keys) {
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

    fn replace_all(&mut self, pods: Vec<Pod>) {
        let identities = pods.iter().filter_map(|pod| PodIdentity::from_pod(pod, &self.keys)).collect();
        let changes = self.store.replace_all(identities);
        self.publish(changes);
    }
}

/// Feeds the namespace store.
pub struct NamespaceSink {
    pub store: Arc<NamespaceStore>,
    pub rules: NamespaceRules,
}

impl WatchSink<Namespace> for NamespaceSink {
    fn apply(&mut self, namespace: Namespace) {
        self.store.set(&namespace.name_any(), self.rules.rule_of(&namespace));
    }

    fn delete(&mut self, namespace: Namespace) {
        self.store.set(&namespace.name_any(), None);
    }

    fn replace_all(&mut self, namespaces: Vec<Namespace>) {
        let rules = namespaces.iter().filter_map(|ns| Some((ns.name_any(), self.rules.rule_of(ns)?)));
        self.store.replace_all(rules);
    }
}

/// Watches the pods scheduled to `node` (a field selector, so each agent sees its own node's
/// pods only, not the whole cluster's as kube2iam does).
pub async fn watch_pods(client: Client, node: &str, mut sink: PodSink) {
    let metrics = sink.metrics.clone();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher(Api::<Pod>::all(client), config).default_backoff();
    drive(stream, &mut sink, "pods", &metrics).await;
}

/// Watches every namespace, for their allow lists.
pub async fn watch_namespaces(client: Client, mut sink: NamespaceSink, metrics: Arc<Metrics>) {
    let stream = watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    drive(stream, &mut sink, "namespaces", &metrics).await;
}
