//! Refresh-ahead: credentials are fetched again once less than `--iam-role-session-ttl`
//! remains, in the background, so a pod never waits on STS for a key it already has; and what
//! no pod keeps alive any more is dropped on the way, never refreshed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{CredentialCache, Issued};
use crate::resolve::CredentialKey;

impl CredentialCache {
    /// Refreshes every entry that is due, so pods that have not asked lately still find fresh
    /// credentials, and drops those whose session no pod has any more: whatever escaped the
    /// prefetcher's forgetting never costs an STS call.
    pub async fn refresh_due(self: &Arc<Self>) {
        let mut orphans = Vec::new();
        for (key, issued) in self.entries.iter() {
            if self.liveness.is_live(&key.session_name) {
                self.refresh_if_due(&key, &issued);
            } else {
                orphans.push(key);
            }
        }
        for key in orphans {
            tracing::debug!(session = %key.session_name, role = %key.role, "forgetting credentials of a pod that is gone");
            self.forget(&key).await;
        }
    }

    /// Runs [`Self::refresh_due`] every `period`.
    pub async fn refresh_every(self: Arc<Self>, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            self.refresh_due().await;
        }
    }

    /// Starts a background refresh of `key` when less than the TTL remains of `issued` (and
    /// none is under way): the request that noticed is answered with `issued` meanwhile.
    pub(super) fn refresh_if_due(self: &Arc<Self>, key: &CredentialKey, issued: &Issued) {
        if issued.remaining(SystemTime::now()) >= self.settings.iam_role_session_ttl.refresh_before() {
            return;
        }
        if !self.refreshing.lock().insert(key.clone()) {
            return; // already under way
        }
        let cache = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let fetching = cache.liveness.fetching(&key.session_name);
            match cache.fetch(&key).await {
                Ok(fresh) => {
                    cache.entries.insert(key.clone(), fresh).await;
                    // A pod gone meanwhile: do not bring it back.
                    if fetching.departed() {
                        cache.entries.invalidate(&key).await;
                    }
                }
                Err(_) if fetching.departed() => {}
                Err(error) => tracing::warn!(
                    role = %key.role, session = %key.session_name, %error,
                    "refresh failed; serving the cached credentials while they last"
                ),
            }
            drop(fetching);
            cache.refreshing.lock().remove(&key);
        });
    }
}

#[cfg(test)]
mod tests {
    //! On paused time, as the cache's tests.

    use std::time::Duration;

    use crate::credentials::fake::{FakeSts, arrives, cache, key, settle};

    #[tokio::test(start_paused = true)]
    async fn credentials_due_for_refresh_are_served_and_refreshed_in_the_background() {
        // 20 minutes of validity is less than the 30-minute refresh point.
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::from_millis(10));
        let cache = cache(&sts, Duration::ZERO);
        arrives(&cache, "u1", "ns.pod");
        let first = cache.get(&key("ns.pod")).await.unwrap();
        let second = cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(first.credentials, second.credentials, "the request does not wait for the refresh");
        settle(&sts, 2).await;
        assert_eq!(sts.calls(), 2);
        let third = cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(third.credentials.access_key_id, "ASIA1-ns.pod", "the refreshed credentials are served");
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_due_drops_the_keys_of_pods_that_are_gone() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        arrives(&cache, "u-here", "ns.here");
        cache.get(&key("ns.gone")).await.unwrap();
        cache.get(&key("ns.here")).await.unwrap();
        cache.refresh_due().await;
        let left: Vec<String> = cache.snapshot().iter().map(|(k, _)| k.session_name.to_string()).collect();
        assert_eq!(left, ["ns.here"], "the departed pod's key is dropped, not refreshed");
        settle(&sts, 3).await;
        assert_eq!(sts.calls(), 3, "the live pod's due key was refreshed");
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_due_refreshes_idle_entries() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        arrives(&cache, "u1", "ns.pod");
        cache.get(&key("ns.pod")).await.unwrap(); // a miss: fetched, no refresh yet
        assert_eq!(sts.calls(), 1);
        cache.refresh_due().await;
        settle(&sts, 2).await;
        assert_eq!(sts.calls(), 2);
    }
}
