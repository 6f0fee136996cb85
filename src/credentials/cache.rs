//! The credential cache: one STS call per key however many requests arrive, credentials
//! refreshed ahead of expiry in the background, and cached credentials kept while STS fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use super::Issued;
use super::sts::{RoleAssumer, StsClientSettings, StsError};
use crate::metrics::{Metrics, StsLabels};
use crate::policy::RoleArn;
use crate::resolve::{CredentialKey, SessionRules, SessionTagging};

/// Credentials closer to expiry than this are never handed out, even while STS is failing.
const MIN_VALIDITY: Duration = Duration::from_secs(60);

/// Most keys kept: pods with roles on one node, with room to spare.
const CAPACITY: u64 = 20_000;

/// STS and the cache in front of it, from the STS flags.
#[derive(Debug, Clone)]
pub struct StsSettings {
    /// How long sessions last and when they are refreshed (`--iam-role-session-ttl`).
    pub sessions: SessionRules,
    /// How long a failed AssumeRole is remembered (zero: not at all).
    pub iam_role_error_ttl: Duration,
    /// Longest wait for one AssumeRole, and for a request whose credentials are not cached.
    pub sts_timeout: Duration,
    /// Most AssumeRole calls in flight at once: a node full of new pods (or a restart on a
    /// busy node) prefetches without a burst of connections or STS throttling.
    pub sts_concurrency: usize,
    /// Call the region's STS endpoint rather than the global one.
    pub use_regional_sts_endpoint: bool,
    /// `--session-tags` (with `--cluster-name`): tag each session with the pod's attributes.
    pub session_tags: Option<SessionTagging>,
    /// `--assume-role-arn`: the intermediate role the pods' roles are assumed with.
    pub assume_role_arn: Option<RoleArn>,
}

impl StsSettings {
    /// Says at startup what the STS flags change from plain AssumeRole: the intermediate
    /// role, session tags, and a session TTL lowered to fit STS's role-chaining cap.
    pub fn announce(&self) {
        if let Some(role) = &self.assume_role_arn {
            tracing::info!(%role, "pods' roles are assumed with this intermediate role's session (--assume-role-arn)");
        }
        if let Some(tagging) = &self.session_tags {
            tracing::info!(
                cluster_name = tagging.cluster_name.as_deref(),
                "sessions carry the pods' tags (--session-tags)"
            );
        }
        if let Some(requested) = self.sessions.lowered_from() {
            tracing::warn!(
                requested = %humantime::format_duration(requested),
                used = %humantime::format_duration(self.sessions.refresh_before()),
                "--iam-role-session-ttl is lowered: STS caps role-chained sessions (an instance profile's, IRSA's) at \
                 1h and sessions last twice the TTL; credentials are refreshed with this much left"
            );
        }
    }

    /// How the STS client of the agent on `node` is built.
    pub fn client(&self, node: &str) -> StsClientSettings {
        StsClientSettings {
            regional: self.use_regional_sts_endpoint,
            timeout: self.sts_timeout,
            intermediate_role: self.assume_role_arn.clone(),
            node: node.to_string(),
        }
    }
}

/// Why no credentials could be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot assume role {role}: {error}")]
    Sts { role: String, error: Arc<StsError> },
    #[error("credentials for role {role} are still being fetched after {}; try again", humantime::format_duration(*waited))]
    Busy { role: String, waited: Duration },
}

/// Entries live until their credentials are about to expire.
struct UntilExpiry;

impl Expiry<CredentialKey, Arc<Issued>> for UntilExpiry {
    fn expire_after_create(&self, _: &CredentialKey, value: &Arc<Issued>, _: Instant) -> Option<Duration> {
        Some(value.remaining(SystemTime::now()).saturating_sub(MIN_VALIDITY))
    }

    fn expire_after_update(
        &self,
        _: &CredentialKey,
        value: &Arc<Issued>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining(SystemTime::now()).saturating_sub(MIN_VALIDITY))
    }
}

/// Credentials by (role, external ID, session name).
pub struct CredentialCache {
    entries: Cache<CredentialKey, Arc<Issued>>,
    failures: Option<Cache<CredentialKey, Arc<StsError>>>,
    refreshing: Mutex<HashSet<CredentialKey>>,
    /// Sessions with a fetch under way, and whether their pod was forgotten meanwhile: a
    /// fetch's result is inserted after it completes, so forgetting alone could be undone.
    in_flight: Mutex<HashMap<Arc<str>, InFlight>>,
    sts_permits: tokio::sync::Semaphore,
    assumer: Arc<dyn RoleAssumer>,
    settings: StsSettings,
    metrics: Arc<Metrics>,
}

impl CredentialCache {
    pub fn new(assumer: Arc<dyn RoleAssumer>, settings: StsSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let entries = Cache::builder().max_capacity(CAPACITY).expire_after(UntilExpiry).build();
        let failures = (!settings.iam_role_error_ttl.is_zero())
            .then(|| Cache::builder().max_capacity(CAPACITY).time_to_live(settings.iam_role_error_ttl).build());
        let sts_permits = tokio::sync::Semaphore::new(settings.sts_concurrency.max(1));
        let (refreshing, in_flight) = (Mutex::default(), Mutex::default());
        Arc::new(Self { entries, failures, refreshing, in_flight, sts_permits, assumer, settings, metrics })
    }

    /// Credentials for `key`: from memory when possible (starting a background refresh if
    /// they are due for one), else from STS, one call for all concurrent requests.
    pub async fn get(self: &Arc<Self>, key: &CredentialKey) -> Result<Arc<Issued>, CredentialError> {
        if let Some(issued) = self.entries.get(key).await {
            self.metrics.cache_hits.inc();
            self.refresh_if_due(key, &issued);
            return Ok(issued);
        }
        let sts_error = |error: Arc<StsError>| CredentialError::Sts { role: key.role.to_string(), error };
        if let Some(error) = self.recent_failure(key).await {
            return Err(sts_error(error));
        }
        self.metrics.cache_misses.inc();
        let fetching = self.track(&key.session_name);
        let issued = self.entries.try_get_with_by_ref(key, self.fetch(key)).await.map_err(sts_error)?;
        if fetching.forgotten() {
            // The pod went while its credentials were being fetched: take back what the
            // fetch just inserted (`forget_session` marked this before invalidating).
            self.entries.invalidate(key).await;
            return Err(sts_error(Arc::new(StsError::other("the pod is gone"))));
        }
        Ok(issued)
    }

    /// Counts a fetch for `session` under way until the returned guard is dropped.
    fn track(&self, session: &Arc<str>) -> Fetching<'_> {
        self.in_flight.lock().entry(session.clone()).or_default().count += 1;
        Fetching { cache: self, session: session.clone() }
    }

    /// Starts fetching credentials for `key` without waiting: a pod's first request then
    /// finds them in memory.
    pub fn prefetch(self: &Arc<Self>, key: CredentialKey) {
        // A live pod under this session (a StatefulSet's, recreated under the same name):
        // what is being fetched for it is wanted again.
        if let Some(fetching) = self.in_flight.lock().get_mut(&key.session_name) {
            fetching.forgotten = false;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            // A failure is logged (once) by `fetch`; the pod's request will try again.
            let _ = cache.get(&key).await;
        });
    }

    /// Drops `key` (its pod is gone): no more refreshes for it.
    pub async fn forget(&self, key: &CredentialKey) {
        self.entries.invalidate(key).await;
        if let Some(failures) = &self.failures {
            failures.invalidate(key).await;
        }
    }

    /// Forgets every key of the session `session` (one pod's) but `keep`: when the pod goes,
    /// or its role changes, its keys go too, whether prefetched or made by a request.
    pub async fn forget_session(&self, session: &str, keep: Option<&CredentialKey>) {
        // First mark fetches under way, so none of them can bring a key back afterwards.
        if let Some(fetching) = self.in_flight.lock().get_mut(session) {
            fetching.forgotten = true;
        }
        let stale = |key: &CredentialKey| &*key.session_name == session && Some(key) != keep;
        let keys: Vec<Arc<CredentialKey>> = self.entries.iter().map(|(key, _)| key).filter(|k| stale(k)).collect();
        let failed: Vec<Arc<CredentialKey>> = self
            .failures
            .iter()
            .flat_map(|failures| failures.iter().map(|(key, _)| key))
            .filter(|k| stale(k))
            .collect();
        for key in keys.iter().chain(&failed) {
            self.forget(key).await;
        }
    }

    /// Refreshes every entry that is due, so pods that have not asked lately still find fresh
    /// credentials, and drops those whose pod is gone (`live` says which sessions still have
    /// one): whatever escaped the prefetcher's forgetting never costs an STS call. Called
    /// periodically.
    pub async fn refresh_due(self: &Arc<Self>, live: impl Fn(&str) -> bool) {
        let mut orphans = Vec::new();
        for (key, issued) in self.entries.iter() {
            if live(&key.session_name) {
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

    /// `--sts-timeout`: the longest a request waits for credentials not cached yet.
    pub fn sts_timeout(&self) -> Duration {
        self.settings.sts_timeout
    }

    /// Runs [`Self::refresh_due`] every `period`, with the sessions of the pods on the node
    /// now (`live_sessions`).
    pub async fn refresh_every(self: Arc<Self>, period: Duration, live_sessions: impl Fn() -> HashSet<String>) {
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            let live = live_sessions();
            self.refresh_due(|session| live.contains(session)).await;
        }
    }

    /// Every cached key with its expiry, for `/debug/store`.
    pub fn snapshot(&self) -> Vec<(Arc<CredentialKey>, SystemTime)> {
        self.entries.iter().map(|(key, issued)| (key, issued.credentials.expiration)).collect()
    }

    async fn recent_failure(&self, key: &CredentialKey) -> Option<Arc<StsError>> {
        self.failures.as_ref()?.get(key).await
    }

    fn refresh_if_due(self: &Arc<Self>, key: &CredentialKey, issued: &Issued) {
        if issued.remaining(SystemTime::now()) >= self.settings.sessions.refresh_before() {
            return;
        }
        if !self.refreshing.lock().insert(key.clone()) {
            return; // already under way
        }
        let cache = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let fetching = cache.track(&key.session_name);
            match cache.fetch(&key).await {
                Ok(fresh) => {
                    cache.entries.insert(key.clone(), fresh).await;
                    // A pod forgotten meanwhile: do not bring it back.
                    if fetching.forgotten() {
                        cache.entries.invalidate(&key).await;
                    }
                }
                Err(_) if fetching.forgotten() => {}
                Err(error) => tracing::warn!(
                    role = %key.role, session = %key.session_name, %error,
                    "refresh failed; serving the cached credentials while they last"
                ),
            }
            cache.refreshing.lock().remove(&key);
        });
    }

    /// One AssumeRole call, timed, counted, and bounded by the STS timeout once its turn
    /// among the concurrent calls has come (a queue of prefetches is not a slow STS).
    async fn fetch(&self, key: &CredentialKey) -> Result<Arc<Issued>, StsError> {
        let _permit = self.sts_permits.acquire().await.expect("the semaphore is never closed");
        let started = Instant::now();
        let duration = self.settings.sessions.duration();
        let call = self.assumer.assume_role(key, duration);
        let result = match tokio::time::timeout(self.settings.sts_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StsError::other(format!(
                "STS did not answer within {}",
                humantime::format_duration(self.settings.sts_timeout)
            ))),
        };
        self.metrics.sts_duration.observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "success" } else { "error" };
        self.metrics.sts_calls.get_or_create(&StsLabels { result: outcome }).inc();
        match result {
            Ok(credentials) => {
                tracing::debug!(role = %key.role, session = %key.session_name, "assumed role");
                Ok(Arc::new(Issued::new(credentials, SystemTime::now())))
            }
            Err(error) => {
                tracing::warn!(role = %key.role, session = %key.session_name, %error, "AssumeRole failed");
                if let Some(failures) = &self.failures {
                    failures.insert(key.clone(), Arc::new(error.clone())).await;
                }
                Err(error)
            }
        }
    }
}

/// Fetches under way for one session.
#[derive(Debug, Default)]
struct InFlight {
    count: usize,
    forgotten: bool,
}

/// A fetch under way for a session; the count goes down when dropped.
struct Fetching<'a> {
    cache: &'a CredentialCache,
    session: Arc<str>,
}

impl Fetching<'_> {
    /// Whether the session was forgotten since this fetch began.
    fn forgotten(&self) -> bool {
        let in_flight = self.cache.in_flight.lock();
        in_flight.get(&self.session).is_some_and(|f| f.forgotten)
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.cache.in_flight.lock();
        if let Some(fetching) = in_flight.get_mut(&self.session) {
            fetching.count -= 1;
            if fetching.count == 0 {
                in_flight.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::credentials::fake::{FakeSts, settings};
    use crate::policy::RoleArn;

    fn key(session: &str) -> CredentialKey {
        CredentialKey {
            role: RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap(),
            external_id: None,
            session_name: session.into(),
            tags: None,
        }
    }

    fn cache(sts: &Arc<FakeSts>, error_ttl: Duration) -> Arc<CredentialCache> {
        let settings = settings(error_ttl, Duration::from_secs(2), 4);
        CredentialCache::new(sts.clone(), settings, Arc::new(Metrics::new()))
    }

    async fn settle(sts: &FakeSts, calls: usize) {
        for _ in 0..200 {
            if sts.calls() >= calls {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_sts_call() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(50));
        let cache = cache(&sts, Duration::ZERO);
        let shared = key("ns.pod");
        let results = futures::future::join_all((0..50).map(|_| cache.get(&shared))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(sts.calls(), 1);
        let again = cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(again.credentials.access_key_id, "ASIA0-ns.pod");
        assert_eq!(sts.calls(), 1, "served from memory");
        cache.get(&key("ns.other")).await.unwrap();
        assert_eq!(sts.calls(), 2, "another session is another key");
    }

    #[tokio::test]
    async fn credentials_due_for_refresh_are_served_and_refreshed_in_the_background() {
        // 20 minutes of validity is less than the 30-minute refresh point.
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::from_millis(10));
        let cache = cache(&sts, Duration::ZERO);
        let first = cache.get(&key("ns.pod")).await.unwrap();
        let second = cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(first.credentials, second.credentials, "the request does not wait for the refresh");
        settle(&sts, 2).await;
        assert_eq!(sts.calls(), 2);
        let third = cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(third.credentials.access_key_id, "ASIA1-ns.pod", "the refreshed credentials are served");
    }

    #[tokio::test]
    async fn cached_credentials_are_served_while_sts_fails() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::from_secs(5));
        let first = cache.get(&key("ns.pod")).await.unwrap();
        sts.failing.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let served = cache.get(&key("ns.pod")).await.unwrap();
            assert_eq!(served.credentials, first.credentials);
            settle(&sts, 2).await;
        }
        assert!(sts.calls() >= 2, "refreshes were attempted");
    }

    #[tokio::test]
    async fn failures_are_remembered_for_the_error_ttl() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        sts.failing.store(true, Ordering::SeqCst);
        let cache = cache(&sts, Duration::from_millis(300));
        let error = cache.get(&key("ns.pod")).await.unwrap_err();
        assert!(error.to_string().contains("AccessDenied"), "{error}");
        cache.get(&key("ns.pod")).await.unwrap_err();
        assert_eq!(sts.calls(), 1, "the failure is remembered");
        sts.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test]
    async fn prefetch_fills_the_cache_and_forget_empties_it() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        cache.prefetch(key("ns.pod"));
        settle(&sts, 1).await;
        cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(sts.calls(), 1, "the request found the prefetched credentials");
        cache.forget(&key("ns.pod")).await;
        cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test]
    async fn a_fetch_under_way_when_its_pod_goes_leaves_nothing_behind() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(500));
        let cache = cache(&sts, Duration::ZERO);
        let asking = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key("ns.gone")).await }
        });
        settle(&sts, 1).await; // the call is under way
        cache.forget_session("ns.gone", None).await;
        assert!(asking.await.unwrap().is_err(), "the departed pod's request gets nothing");
        assert!(cache.snapshot().is_empty(), "nothing of the departed pod stays to be refreshed");
        assert!(cache.in_flight.lock().is_empty());

        // The same session under a new pod (a StatefulSet's): its prefetch is kept.
        let asking = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key("ns.gone")).await }
        });
        settle(&sts, 2).await;
        cache.forget_session("ns.gone", None).await;
        cache.prefetch(key("ns.gone"));
        let _ = asking.await.unwrap();
        settle(&sts, 2).await;
        for _ in 0..100 {
            if !cache.snapshot().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cache.snapshot().len(), 1, "the new pod's credentials are cached");
    }

    #[tokio::test]
    async fn refresh_due_drops_the_keys_of_pods_that_are_gone() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        cache.get(&key("ns.gone")).await.unwrap();
        cache.get(&key("ns.here")).await.unwrap();
        cache.refresh_due(|session| session != "ns.gone").await;
        let left: Vec<String> = cache.snapshot().iter().map(|(k, _)| k.session_name.to_string()).collect();
        assert_eq!(left, ["ns.here"], "the departed pod's key is dropped, not refreshed");
        settle(&sts, 3).await;
        assert_eq!(sts.calls(), 3, "the live pod's due key was refreshed");
    }

    #[tokio::test]
    async fn refresh_due_refreshes_idle_entries() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        cache.get(&key("ns.pod")).await.unwrap(); // a miss: fetched, no refresh yet
        assert_eq!(sts.calls(), 1);
        cache.refresh_due(|_| true).await;
        settle(&sts, 2).await;
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test]
    async fn sts_calls_are_limited_in_number_at_once() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = cache(&sts, Duration::ZERO); // 4 at once
        let keys: Vec<CredentialKey> = (0..12).map(|i| key(&format!("ns.pod-{i}"))).collect();
        let started = std::time::Instant::now();
        let results = futures::future::join_all(keys.iter().map(|k| cache.get(k))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(sts.calls(), 12);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "12 calls of 100 ms, 4 at a time: {:?}",
            started.elapsed()
        );

        // Waiting for a turn is not STS being slow: calls of 60 ms, two at a time, with a
        // 100 ms timeout all succeed, though the last waits 300 ms for its turn.
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(60));
        let settings = settings(Duration::ZERO, Duration::from_millis(100), 2);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::new(Metrics::new()));
        let results = futures::future::join_all(keys.iter().map(|k| cache.get(k))).await;
        assert!(results.iter().all(Result::is_ok), "queued calls are not cut off by the call timeout");
    }

    #[tokio::test]
    async fn a_slow_sts_is_cut_off_at_the_timeout() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_secs(10));
        let settings = settings(Duration::ZERO, Duration::from_millis(100), 4);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::new(Metrics::new()));
        let error = cache.get(&key("ns.pod")).await.unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");
    }
}
