//! Prefetch: fetch a pod's credentials as soon as the pod appears, and forget them when it
//! goes, so the first request is served from memory and deleted pods stop being refreshed.
//!
//! Forgetting goes by the pod's session (`<namespace>.<pod>`), not by the key prefetched: a
//! request can make a key the prefetcher never did (the pod was seen before its namespace's
//! rule, or the rule changed since), and that key must go with the pod too, even when its
//! fetch is still under way. Which sessions are alive is the cache's [`Liveness`], which the
//! prefetcher tells of every pod arriving and departing.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{CredentialCache, Liveness};
use crate::cluster::Change;
use crate::resolve::{CredentialKey, Resolver, session_of};

/// Follows pod changes and keeps the cache's keys in step with the pods.
pub struct Prefetcher {
    cache: Arc<CredentialCache>,
    resolver: Arc<Resolver>,
    /// The key each pod (by uid) was prefetched under.
    keys: HashMap<String, CredentialKey>,
}

impl Prefetcher {
    pub fn new(cache: Arc<CredentialCache>, resolver: Arc<Resolver>) -> Self {
        Self { cache, resolver, keys: HashMap::new() }
    }

    fn liveness(&self) -> &Liveness {
        &self.cache.liveness
    }

    /// Applies changes until the sender is dropped.
    pub async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>) {
        while let Some(change) = changes.recv().await {
            self.apply(change).await;
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            // Re-announced by the ServiceAccount watch after the pod watch removed it: a
            // departed pod gets no credentials, and no entry here that nothing would remove.
            Change::Reresolve(pod) if !self.liveness().knows(&pod.uid) => {}
            Change::Upserted(pod) | Change::Reresolve(pod) => {
                let session: Arc<str> = session_of(&pod).into();
                let first_sight = self.liveness().arrived(&pod.uid, &session).is_none();
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
                if !first_sight && !self.liveness().shared(&pod.uid, &session) {
                    self.cache.forget_session(&session, key.as_ref()).await;
                }
                if let Some(key) = key {
                    self.cache.prefetch(key);
                }
            }
            Change::Removed(pod) => {
                self.keys.remove(&pod.uid);
                if let Some(session) = self.liveness().departed(&pod.uid) {
                    self.cache.forget_session(&session, None).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::credentials::fake::{FakeSts, settings};
    use crate::metrics::Metrics;
    use crate::pod::PodIdentity;

    fn prefetcher(sts: &Arc<FakeSts>) -> Prefetcher {
        let settings = settings(Duration::ZERO, Duration::from_secs(2), 4);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()));
        Prefetcher::new(cache, Arc::new(Resolver::new(Arc::new(crate::policy::test_policy(None)))))
    }

    fn pod() -> Arc<PodIdentity> {
        Arc::new(PodIdentity {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            role_annotation: Some("app".into()),
            ..PodIdentity::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_reresolve_that_arrives_after_the_pods_removal_changes_nothing() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let mut prefetcher = prefetcher(&sts);
        prefetcher.apply(Change::Upserted(pod())).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sts.calls(), 1);
        prefetcher.apply(Change::Removed(pod())).await;
        prefetcher.apply(Change::Reresolve(pod())).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sts.calls(), 1, "no credentials for a departed pod");
        assert!(prefetcher.liveness().counts() == (0, 0) && prefetcher.keys.is_empty(), "nothing left of it");
        assert!(prefetcher.cache.snapshot().is_empty());

        // While the pod is on the node, a re-announcement is resolved as an update.
        prefetcher.apply(Change::Upserted(pod())).await;
        prefetcher.apply(Change::Reresolve(pod())).await;
        assert_eq!(prefetcher.liveness().counts().0, 1);
    }
}
