//! Prefetch: fetch a pod's credentials as soon as the pod appears, and forget them when it
//! goes, so the first request is served from memory and deleted pods stop being refreshed.
//!
//! Forgetting goes by the pod's session (`<namespace>.<pod>`), not by the key prefetched: a
//! request can make a key the prefetcher never did (the pod was seen before its namespace's
//! rule, or the rule changed since), and that key must go with the pod too, even when its
//! fetch is still under way (the cache takes such a key back once the fetch completes).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::CredentialCache;
use crate::cluster::Change;
use crate::resolve::{CredentialKey, Resolver};

/// Follows pod changes and keeps the cache's keys in step with the pods.
pub struct Prefetcher {
    cache: Arc<CredentialCache>,
    resolver: Arc<Resolver>,
    /// The key each pod (by uid) was prefetched under.
    keys: HashMap<String, CredentialKey>,
    /// The session of every live pod (by uid), with or without a role.
    sessions: HashMap<String, String>,
}

impl Prefetcher {
    pub fn new(cache: Arc<CredentialCache>, resolver: Arc<Resolver>) -> Self {
        Self { cache, resolver, keys: HashMap::new(), sessions: HashMap::new() }
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
                let session = self.resolver.sessions().name(&pod);
                let first_sight = self.sessions.insert(pod.uid.clone(), session.clone()).is_none();
                let key = self.resolver.resolve(&pod).ok().map(|resolved| resolved.key);
                let old = match &key {
                    Some(key) => self.keys.insert(pod.uid.clone(), key.clone()),
                    None => self.keys.remove(&pod.uid),
                };
                if old == key {
                    return;
                }
                // The pod's role changed: what it had before (asked for or prefetched) goes,
                // unless a pod recreated under the same name shares the session.
                if !first_sight && !self.shared(&pod.uid, &session) {
                    self.cache.forget_session(&session, key.as_ref()).await;
                }
                if let Some(key) = key {
                    self.cache.prefetch(key);
                }
            }
            Change::Removed(pod) => {
                self.keys.remove(&pod.uid);
                if let Some(session) = self.sessions.remove(&pod.uid)
                    && !self.shared(&pod.uid, &session)
                {
                    self.cache.forget_session(&session, None).await;
                }
            }
        }
    }

    /// Whether another live pod (a StatefulSet's, recreated under the same name) has `session`.
    fn shared(&self, uid: &str, session: &str) -> bool {
        self.sessions.iter().any(|(other, s)| other != uid && s == session)
    }
}
