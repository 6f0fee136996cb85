//! Prefetch: fetch a pod's credentials as soon as the pod appears, and forget them when it
//! goes, so the first request is served from memory and deleted pods stop being refreshed.
//!
//! Forgetting goes by the pod's session (in `pod` scope `<namespace>.<pod>`, whatever the
//! role; in a shared scope the role's session the pod shares), not by the key prefetched: a
//! request can make a key the prefetcher never did (the pod was seen before its namespace's
//! rule, or the rule changed since), and that key must go with the pod too, even when its
//! fetch is still under way. A shared session goes with its last pod. Which sessions are
//! alive is the cache's [`Liveness`], which the prefetcher tells of every pod arriving and
//! departing.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{CredentialCache, Liveness};
use crate::cluster::Change;
use crate::resolve::{CredentialKey, Resolver};

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
                let key = self.resolver.resolve(&pod).ok().map(|resolved| resolved.key);
                let session: Option<Arc<str>> = self.resolver.session_id(&pod, key.as_ref());
                let arrival = self.liveness().arrived(&pod.uid, session.as_ref());
                if let Some(left) = &arrival.left {
                    // A shared session this pod was the last of (its role changed).
                    self.cache.forget_session(left, None).await;
                }
                let old = match &key {
                    Some(key) => self.keys.insert(pod.uid.clone(), key.clone()),
                    None => self.keys.remove(&pod.uid),
                };
                if old == key {
                    return;
                }
                // The pod's role changed: what it had before (asked for or prefetched) goes,
                // unless another pod shares the session (one recreated under the same name,
                // or any in a shared scope).
                if let Some(session) = &session
                    && !arrival.first_sight
                    && !self.liveness().shared(&pod.uid, session)
                {
                    self.cache.forget_session(session, key.as_ref()).await;
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
    use crate::resolve::SessionScope;

    fn prefetcher(sts: &Arc<FakeSts>) -> Prefetcher {
        scoped(sts, SessionScope::Pod)
    }

    fn scoped(sts: &Arc<FakeSts>, scope: SessionScope) -> Prefetcher {
        let settings = settings(Duration::ZERO, Duration::from_secs(2), 4);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()));
        let resolver = Resolver::new(Arc::new(crate::policy::test_policy(None))).with_scope(scope, "node-a");
        Prefetcher::new(cache, Arc::new(resolver))
    }

    fn member(name: &str, uid: &str, role: &str) -> Arc<PodIdentity> {
        Arc::new(PodIdentity {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            service_account: "web".into(),
            role_annotation: Some(role.into()),
            ..PodIdentity::default()
        })
    }

    /// The cached keys' roles and session names.
    fn cached(prefetcher: &Prefetcher) -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = (prefetcher.cache.snapshot().iter())
            .map(|(key, _, _)| (key.role.name().to_string(), key.session_name.to_string()))
            .collect();
        keys.sort();
        keys
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
    async fn a_shared_session_is_fetched_once_and_kept_until_its_last_pod_goes() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let mut prefetcher = scoped(&sts, SessionScope::Role);
        for (name, uid) in [("web-0", "u1"), ("web-1", "u2"), ("web-2", "u3")] {
            prefetcher.apply(Change::Upserted(member(name, uid, "app"))).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sts.calls(), 1, "one role on the node, one session");
        assert_eq!(cached(&prefetcher), [("app".to_string(), "iamlet@node-a".to_string())]);

        // web-0 moves to another role: app's session stays for web-1 and web-2.
        prefetcher.apply(Change::Upserted(member("web-0", "u1", "batch"))).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(cached(&prefetcher).len(), 2);
        prefetcher.apply(Change::Removed(member("web-1", "u2", "app"))).await;
        assert_eq!(cached(&prefetcher).len(), 2, "web-2 still has app's session");
        // web-2 loses its role: app's session has no pod left.
        let mut unannotated = (*member("web-2", "u3", "")).clone();
        unannotated.role_annotation = None;
        prefetcher.apply(Change::Upserted(Arc::new(unannotated))).await;
        assert_eq!(cached(&prefetcher), [("batch".to_string(), "iamlet@node-a".to_string())]);
        prefetcher.apply(Change::Removed(member("web-0", "u1", "batch"))).await;
        assert!(cached(&prefetcher).is_empty(), "the last pod of batch went");
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn service_account_scope_keeps_one_session_per_service_account() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let mut prefetcher = scoped(&sts, SessionScope::ServiceAccount);
        let mut reader = (*member("report-0", "u3", "app")).clone();
        reader.service_account = "reports".into();
        for pod in [member("web-0", "u1", "app"), member("web-1", "u2", "app"), Arc::new(reader)] {
            prefetcher.apply(Change::Upserted(pod)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sessions = [("app".to_string(), "shop@reports".to_string()), ("app".to_string(), "shop@web".to_string())];
        assert_eq!(cached(&prefetcher), sessions);
        assert_eq!(sts.calls(), 2);
        prefetcher.apply(Change::Removed(member("web-0", "u1", "app"))).await;
        assert_eq!(cached(&prefetcher), sessions, "web-1 still runs as web");
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
