//! Prefetch: fetch a pod's credentials as soon as the pod appears, and forget them when it
//! goes, so the first request is served from memory and deleted pods stop being refreshed.
//!
//! Forgetting goes by the pod's session (`<namespace>.<pod>`), not by the key prefetched: a
//! request can make a key the prefetcher never did (the pod was seen before its namespace's
//! rule, or the rule changed since), and that key must go with the pod too. A fetch already
//! under way when the pod goes re-inserts its key when it completes, so the session is
//! forgotten once more after `--sts-timeout`, the longest a fetch can take: no fetch for the
//! pod can start after it left the index.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

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
    /// The session of every live pod (by uid), with or without a role.
    sessions: HashMap<String, String>,
    /// Sessions of departed pods to forget again once fetches under way have ended, in order.
    retiring: VecDeque<(Instant, String)>,
    /// The longest a fetch can take (`--sts-timeout`).
    fetch_bound: Duration,
}

impl Prefetcher {
    pub fn new(
        cache: Arc<CredentialCache>,
        policy: Arc<Policy>,
        namespaces: Option<Arc<NamespaceStore>>,
        fetch_bound: Duration,
    ) -> Self {
        let (keys, sessions, retiring) = (HashMap::new(), HashMap::new(), VecDeque::new());
        Self { cache, policy, namespaces, keys, sessions, retiring, fetch_bound }
    }

    /// Applies changes until the sender is dropped.
    pub async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>) {
        loop {
            let next = self.retiring.front().map(|(due, _)| *due);
            tokio::select! {
                change = changes.recv() => match change {
                    Some(change) => self.apply(change).await,
                    None => return,
                },
                () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.retire_due().await;
                }
            }
        }
    }

    /// Forgets, once more, the sessions of pods gone long enough for every fetch to have ended.
    async fn retire_due(&mut self) {
        let now = Instant::now();
        while let Some((due, session)) = self.retiring.front().cloned() {
            if due > now {
                break;
            }
            self.retiring.pop_front();
            if !self.sessions.values().any(|s| *s == session) {
                self.cache.forget_session(&session, None).await;
            }
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            Change::Upserted(pod) => {
                let session = super::session_name(&pod.namespace, &pod.name);
                let first_sight = self.sessions.insert(pod.uid.clone(), session.clone()).is_none();
                let rule = self.namespaces.as_ref().and_then(|store| store.rule(&pod.namespace));
                let key = self.policy.resolve(&pod, rule.as_deref()).ok().map(|a| CredentialKey::for_pod(&pod, &a));
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
                    self.retiring.push_back((Instant::now() + self.fetch_bound, session));
                }
            }
        }
    }

    /// Whether another live pod (a StatefulSet's, recreated under the same name) has `session`.
    fn shared(&self, uid: &str, session: &str) -> bool {
        self.sessions.iter().any(|(other, s)| other != uid && s == session)
    }
}
