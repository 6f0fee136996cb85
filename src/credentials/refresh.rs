//! Refresh-ahead: credentials are fetched again once less than `--iam-role-session-ttl`
//! remains (a little earlier, at random, so keys fetched together do not come due together),
//! in the background, so a pod never waits on STS for a key it already has; and what no pod
//! keeps alive any more is dropped on the way, never refreshed.

use std::sync::Arc;

use std::time::{Duration, SystemTime};
use tokio::sync::watch;

use super::queue::Priority;
use super::{CredentialCache, Issued};
use crate::resolve::CredentialKey;

/// How much earlier than `--iam-role-session-ttl` before expiry a refresh may come, as a
/// share of that TTL: spread over it, the keys fetched at once at a start or a hand-over are
/// refreshed over minutes, not all in the same 30-second scan, and a fleet's rollout never
/// synchronises its STS calls 15 to 30 minutes later.
pub const REFRESH_JITTER: f64 = 0.25;

/// When credentials expiring at `expiration` are refreshed: `refresh_before` ahead of it
/// (as STS's `Expiration` says, whatever duration was asked), brought forward by `jitter`
/// (0 to 1) times [`REFRESH_JITTER`] of `refresh_before`. Never later than `refresh_before`
/// ahead: SDKs refresh within their last 15 minutes and must find fresh credentials.
pub fn refresh_point(expiration: SystemTime, refresh_before: Duration, jitter: f64) -> SystemTime {
    let early = refresh_before.mul_f64(REFRESH_JITTER * jitter.clamp(0.0, 1.0));
    expiration.checked_sub(refresh_before + early).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A uniform random number in [0, 1).
pub fn jitter() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

impl CredentialCache {
    /// Refreshes every entry that is due, so pods that have not asked lately still find fresh
    /// credentials, and drops those whose session no pod has any more: whatever escaped the
    /// prefetcher's forgetting never costs an STS call.
    pub async fn refresh_due(self: &Arc<Self>) {
        self.report_budget();
        let mut orphans = Vec::new();
        for (key, issued) in self.entries.iter() {
            if self.liveness.is_live(&key.session_id()) {
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

    /// Runs [`Self::refresh_due`] every `period`, the first one half a period to one and a
    /// half after the pod cache has synced (`pods_synced`): before, every session would look
    /// departed, and what a predecessor handed over would be dropped.
    pub async fn refresh_every(self: Arc<Self>, period: Duration, mut pods_synced: watch::Receiver<bool>) {
        let _ = pods_synced.wait_for(|synced| *synced).await;
        // At a random phase: agents started together (a rollout, a crash of all) would
        // otherwise scan, and send their due refreshes to STS, in the same second.
        let first = tokio::time::Instant::now() + period.mul_f64(0.5 + jitter());
        let mut ticks = tokio::time::interval_at(first, period);
        loop {
            ticks.tick().await;
            self.refresh_due().await;
        }
    }

    /// Starts a background refresh of `key` when less than the TTL remains of `issued` (and
    /// none is under way): the request that noticed is answered with `issued` meanwhile.
    pub(super) fn refresh_if_due(self: &Arc<Self>, key: &CredentialKey, issued: &Issued) {
        if self.clock.now() < issued.refresh_at || self.is_retired() || self.adopted.is_unclaimed(key) {
            return;
        }
        if !self.refreshing.lock().insert(key.clone()) {
            return; // already under way
        }
        let cache = self.clone();
        let key = key.clone();
        let issued_left = issued.remaining(cache.clock.now());
        tokio::spawn(async move {
            let fetching = cache.liveness.fetching(&key.session_id());
            // Tried again through throttling while the cached credentials may still be served.
            let left = issued_left.saturating_sub(super::cache::MIN_VALIDITY);
            match cache.fetch(&key, Priority::Refresh, tokio::time::Instant::now() + left).await {
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

    use std::time::{Duration, SystemTime};

    use super::{REFRESH_JITTER, jitter, refresh_point};
    use crate::credentials::fake::{FakeSts, arrives, cache, key, settle};

    #[test]
    fn refresh_points_spread_over_a_quarter_of_the_ttl_never_later() {
        let expiration = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let ttl = Duration::from_secs(900);
        assert_eq!(refresh_point(expiration, ttl, 0.0), expiration - ttl);
        assert_eq!(refresh_point(expiration, ttl, 1.0), expiration - ttl - ttl.mul_f64(REFRESH_JITTER));
        let mut points: Vec<SystemTime> = (0..1000).map(|_| refresh_point(expiration, ttl, jitter())).collect();
        assert!(points.iter().all(|p| *p <= expiration - ttl), "never within the SDKs' refresh window");
        points.sort();
        let spread = points[999].duration_since(points[0]).unwrap();
        assert!(spread > Duration::from_secs(200), "1000 keys fetched at once spread over {spread:?}");
        let distinct: std::collections::HashSet<_> = points.iter().collect();
        assert!(distinct.len() > 900, "they do not come due together");
    }

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
        let left: Vec<String> = cache.snapshot().iter().map(|(k, _, _)| k.session_name.to_string()).collect();
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
