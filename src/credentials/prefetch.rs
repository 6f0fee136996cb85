//! Prefetch: fetch a pod's credentials as soon as the pod appears, and forget them when it
//! goes, so the first request is served from memory and deleted pods stop being refreshed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{CredentialCache, CredentialKey};
use crate::cluster::{Change, NamespaceStore};
use crate::policy::Policy;

/// Follows pod changes and keeps the cache's keys in step with the pods.
pub struct Prefetcher {
    pub cache: Arc<CredentialCache>,
    pub policy: Arc<Policy>,
    pub namespaces: Option<Arc<NamespaceStore>>,
    /// The key each pod (by uid) was prefetched under.
    keys: HashMap<String, CredentialKey>,
}

impl Prefetcher {
    pub fn new(cache: Arc<CredentialCache>, policy: Arc<Policy>, namespaces: Option<Arc<NamespaceStore>>) -> Self {
        Self { cache, policy, namespaces, keys: HashMap::new() }
    }

    /// Applies changes until the sender is dropped.
    pub async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>) {
        while let Some(change) = changes.recv().await {
            self.apply(change).await;
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            Change::Upserted(pod) => {
                let rule = self.namespaces.as_ref().and_then(|store| store.rule(&pod.namespace));
                let key = self.policy.resolve(&pod, rule.as_deref()).ok().map(|a| CredentialKey::for_pod(&pod, &a));
                let old = match &key {
                    Some(key) => self.keys.insert(pod.uid.clone(), key.clone()),
                    None => self.keys.remove(&pod.uid),
                };
                if old == key {
                    return;
                }
                if let Some(old) = old {
                    self.forget_unless_shared(&old).await;
                }
                if let Some(key) = key {
                    self.cache.prefetch(key);
                }
            }
            Change::Removed(pod) => {
                if let Some(old) = self.keys.remove(&pod.uid) {
                    self.forget_unless_shared(&old).await;
                }
            }
        }
    }

    /// A pod recreated under the same name (a StatefulSet's) shares its predecessor's key.
    async fn forget_unless_shared(&self, key: &CredentialKey) {
        if !self.keys.values().any(|k| k == key) {
            self.cache.forget(key).await;
        }
    }
}
