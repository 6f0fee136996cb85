//! The credential cache: one STS call per key however many requests arrive, credentials
//! refreshed ahead of expiry in the background, and cached credentials kept while STS fails.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use super::adopt::Adopted;
use super::queue::{Permit, Priority, StsQueue};
use super::recent::RecentAsks;
use super::refresh::refresh_point;
use super::sts::{Failure, RoleAssumer, StsError};
use super::{Issued, Liveness, StsSettings};
use crate::clock::Clock;
use crate::metrics::{Metrics, StsLabels};
use crate::resolve::CredentialKey;

/// Credentials closer to expiry than this are never handed out, even while STS is failing or
/// throttling: an SDK handed credentials with less left asks again on every call.
pub(super) const MIN_VALIDITY: Duration = Duration::from_secs(5 * 60);

/// Credentials handed out with less than this left are counted as late
/// (`iamlet_credentials_served_late_total`): SDKs refresh within their last 15 minutes
/// (botocore's advisory window), so credentials this close to expiry mean refreshes have been
/// failing, as under STS throttling.
pub const LATE: Duration = Duration::from_secs(15 * 60);

/// Most keys kept: pods with roles on one node, with room to spare.
const CAPACITY: u64 = 20_000;

/// Why no credentials could be handed out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot assume role {role}: {error}")]
    Sts { role: String, error: Arc<StsError> },
    #[error("credentials for role {role} are still being fetched after {}; try again", humantime::format_duration(*waited))]
    Busy { role: String, waited: Duration },
}

/// Entries live until their credentials are about to expire. Eviction only: moka's timer is
/// the system's, so a read checks the credentials' validity itself (see [`Clock`]).
struct UntilExpiry(Clock);

impl Expiry<CredentialKey, Arc<Issued>> for UntilExpiry {
    fn expire_after_create(&self, _: &CredentialKey, value: &Arc<Issued>, _: Instant) -> Option<Duration> {
        Some(value.remaining(self.0.now()).saturating_sub(MIN_VALIDITY))
    }

    fn expire_after_update(
        &self,
        _: &CredentialKey,
        value: &Arc<Issued>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining(self.0.now()).saturating_sub(MIN_VALIDITY))
    }
}

/// Credentials by (role, external ID, session name).
pub struct CredentialCache {
    pub(super) entries: Cache<CredentialKey, Arc<Issued>>,
    /// Recent AssumeRole failures and when they happened (tokio's clock, so tests can pause
    /// it); moka's own expiry only bounds how long an entry may linger.
    pub(super) failures: Option<Cache<CredentialKey, (Arc<StsError>, tokio::time::Instant)>>,
    /// Keys being refreshed in the background (see `refresh`).
    pub(super) refreshing: Mutex<HashSet<CredentialKey>>,
    /// Taken from a predecessor and not yet wanted here (see `adopt`).
    pub(super) adopted: Adopted,
    /// Handed over to a successor: no more refreshes or prefetches.
    pub(super) retired: AtomicBool,
    /// Which sessions still have a pod, and the fetches under way for them.
    pub(super) liveness: Arc<Liveness>,
    /// Which sessions pods asked for in the last minutes: their prefetches go first.
    pub(super) recent: Arc<RecentAsks>,
    /// At most `--sts-concurrency` calls at once, requests first.
    queue: StsQueue,
    assumer: Arc<dyn RoleAssumer>,
    pub(super) settings: StsSettings,
    metrics: Arc<Metrics>,
    /// Wall-clock time: the system's, or tokio's in simulations.
    pub(super) clock: Clock,
}

impl CredentialCache {
    /// A cache that fetches with `assumer`, as `settings` say, keeping what `liveness` says
    /// is alive.
    pub fn new(
        assumer: Arc<dyn RoleAssumer>,
        settings: StsSettings,
        liveness: Arc<Liveness>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_clock(assumer, settings, liveness, metrics, Clock::System)
    }

    /// The same, telling the time by `clock` (the fleet simulation's follows tokio's paused
    /// clock).
    pub fn with_clock(
        assumer: Arc<dyn RoleAssumer>,
        settings: StsSettings,
        liveness: Arc<Liveness>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Arc<Self> {
        let entries = Cache::builder().max_capacity(CAPACITY).expire_after(UntilExpiry(clock)).build();
        let failures = (!settings.iam_role_error_ttl.is_zero())
            .then(|| Cache::builder().max_capacity(CAPACITY).time_to_live(settings.iam_role_error_ttl).build());
        let queue = StsQueue::new(settings.sts_concurrency, Some(settings.sts_budget));
        let refreshing = Mutex::default();
        let (adopted, retired, recent) = (Adopted::default(), AtomicBool::new(false), Arc::default());
        Arc::new(Self {
            entries,
            failures,
            refreshing,
            adopted,
            retired,
            liveness,
            recent,
            queue,
            assumer,
            settings,
            metrics,
            clock,
        })
    }

    /// Credentials for `key`, for a pod's request: from memory when possible (starting a
    /// background refresh if they are due for one), else from STS, one call for all
    /// concurrent requests, ahead of every refresh and prefetch waiting for its turn.
    pub async fn get(self: &Arc<Self>, key: &CredentialKey) -> Result<Arc<Issued>, CredentialError> {
        self.get_until(key, tokio::time::Instant::now() + self.settings.sts_timeout).await
    }

    /// The same, retrying a call STS throttled or failed on its side only while a try can
    /// start before `until` (the request's `--backoff-max-elapsed-time`): the pod is then
    /// answered with an error its SDK retries, and the failure is not remembered.
    pub async fn get_until(
        self: &Arc<Self>,
        key: &CredentialKey,
        until: tokio::time::Instant,
    ) -> Result<Arc<Issued>, CredentialError> {
        self.recent.asked(&key.session_id(), self.clock.now());
        let issued = self.get_with(key, Priority::Demand, until).await?;
        if issued.remaining(self.clock.now()) < LATE {
            self.metrics.credentials_served_late.inc();
        }
        Ok(issued)
    }

    async fn get_with(
        self: &Arc<Self>,
        key: &CredentialKey,
        priority: Priority,
        until: tokio::time::Instant,
    ) -> Result<Arc<Issued>, CredentialError> {
        if let Some(issued) = self.entries.get(key).await {
            if issued.remaining(self.clock.now()) > MIN_VALIDITY {
                self.metrics.cache_hits.inc();
                self.adopted.claim(key);
                self.refresh_if_due(key, &issued);
                return Ok(issued);
            }
            // Too close to expiry to hand out, and not evicted yet (moka's timer is the
            // system's, not necessarily this cache's clock): fetched again.
            self.entries.invalidate(key).await;
        }
        let sts_error = |error: Arc<StsError>| CredentialError::Sts { role: key.role.to_string(), error };
        if let Some(error) = self.recent_failure(key).await {
            return Err(sts_error(error));
        }
        self.metrics.cache_misses.inc();
        let fetching = self.liveness.fetching(&key.session_id());
        // A request promotes the prefetch it joins (the cache runs one fetch per key).
        let _demand = (priority == Priority::Demand).then(|| self.queue.demand(key, until));
        let issued =
            self.entries.try_get_with_by_ref(key, self.fetch(key, priority, until)).await.map_err(sts_error)?;
        if fetching.departed() {
            // The pod went while its credentials were being fetched: take back what the
            // fetch just inserted (the session was marked before it was forgotten).
            self.entries.invalidate(key).await;
            return Err(sts_error(Arc::new(StsError::other("the pod is gone"))));
        }
        Ok(issued)
    }

    /// Starts fetching credentials for `key` without waiting: a pod's first request then
    /// finds them in memory. A session asked for in the last minutes (before this agent
    /// started too) goes before the others.
    pub fn prefetch(self: &Arc<Self>, key: CredentialKey) {
        if self.is_retired() {
            return;
        }
        let priority = match self.recent.is_recent(&key.session_id(), self.clock.now()) {
            true => Priority::PrefetchAsked,
            false => Priority::Prefetch,
        };
        let cache = self.clone();
        tokio::spawn(async move {
            // A failure is logged (once) by `fetch`; the pod's request will try again.
            let until = tokio::time::Instant::now() + PREFETCH_RETRIES_FOR;
            let _ = cache.get_with(&key, priority, until).await;
        });
    }

    /// Sets `iamlet_sts_budget_tokens` and `iamlet_sts_background_pace` to what they are now.
    pub(super) fn report_budget(&self) {
        if let Some(tokens) = self.queue.budget_tokens() {
            self.metrics.sts_budget_tokens.set(tokens);
        }
        if let Some(pace) = self.queue.background_pace() {
            self.metrics.sts_background_pace.set(pace);
        }
    }

    /// `--sts-timeout`: the longest a request waits for credentials not cached yet.
    pub fn sts_timeout(&self) -> Duration {
        self.settings.sts_timeout
    }

    /// Every cached key with its expiry and refresh point, for `/debug/store`.
    pub fn snapshot(&self) -> Vec<(Arc<CredentialKey>, SystemTime, SystemTime)> {
        self.entries.iter().map(|(key, issued)| (key, issued.credentials.expiration, issued.refresh_at)).collect()
    }

    async fn recent_failure(&self, key: &CredentialKey) -> Option<Arc<StsError>> {
        let (error, at) = self.failures.as_ref()?.get(key).await?;
        (at.elapsed() < self.settings.iam_role_error_ttl).then_some(error)
    }

    /// AssumeRole for `key`, tried again after a throttled or transient failure (see
    /// [`backoff`]) while the next try can start before `until`, or, while requests wait for
    /// `key`, before the most patient one's deadline; a background call also stops once its
    /// session departs or the cache is retired. A final failure is remembered for
    /// `--iam-role-error-ttl`; a retryable one never is.
    pub(super) async fn fetch(
        &self,
        key: &CredentialKey,
        priority: Priority,
        until: tokio::time::Instant,
    ) -> Result<Arc<Issued>, StsError> {
        let mut attempt = 0;
        // The last failure of a call a request was waiting for: while a request still waits,
        // the next call is its retry, made now in a background call's place or not at all.
        let mut failed_a_request: Option<StsError> = None;
        loop {
            let mut turn = None;
            if let Some(failure) = &failed_a_request
                && self.queue.demanded_until(key).is_some()
            {
                match self.queue.retry_now() {
                    Some(now) => turn = Some(now),
                    None => return Err(failure.clone()),
                }
            }
            let answer = self.call(key, priority, turn).await;
            let error = match answer {
                Ok(issued) => return Ok(issued),
                Err(error) => error,
            };
            if priority == Priority::Demand || self.queue.demanded_until(key).is_some() {
                failed_a_request = Some(error.clone());
            }
            // A request joined this fetch (or made it): its pod's wait bounds the retries.
            let demanded = self.queue.demanded_until(key);
            let (class, until) = match (priority, demanded) {
                (Priority::Demand, Some(demanded)) => (Priority::Demand, until.max(demanded)),
                (_, Some(demanded)) => (Priority::Demand, demanded),
                (_, None) => (priority, until),
            };
            let delay = backoff(class, attempt, super::refresh::jitter());
            attempt += 1;
            let gone = class != Priority::Demand && (self.is_retired() || !self.liveness.is_live(&key.session_id()));
            if !error.failure.is_retryable() || gone || tokio::time::Instant::now() + delay >= until {
                // A refresh says so itself, with what it means for the pod.
                if priority != Priority::Refresh {
                    tracing::warn!(role = %key.role, session = %key.session_name, %error, attempts = attempt, "AssumeRole failed");
                }
                if !error.failure.is_retryable()
                    && let Some(failures) = &self.failures
                {
                    failures.insert(key.clone(), (Arc::new(error.clone()), tokio::time::Instant::now())).await;
                }
                return Err(error);
            }
            tracing::debug!(role = %key.role, session = %key.session_name, %error, retry_in = ?delay, "AssumeRole to be tried again");
            self.pause(key, delay, class != Priority::Demand).await;
        }
    }

    /// Waits `delay` before the next try; a background call waits less if a request starts
    /// waiting for its key meanwhile: the request must not wait out a prefetch's backoff.
    async fn pause(&self, key: &CredentialKey, delay: Duration, background: bool) {
        let until = tokio::time::Instant::now() + delay;
        loop {
            let demanded = self.queue.demand_arrived();
            tokio::pin!(demanded);
            demanded.as_mut().enable();
            if background && self.queue.demanded_until(key).is_some() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                () = &mut demanded => {}
            }
        }
    }

    /// One AssumeRole call, timed, counted, and bounded by the STS timeout once its turn
    /// among the concurrent calls (and in the node's budget) has come: a queue of prefetches
    /// is not a slow STS.
    async fn call(
        &self,
        key: &CredentialKey,
        priority: Priority,
        turn: Option<Permit>,
    ) -> Result<Arc<Issued>, StsError> {
        let _turn = match turn {
            Some(turn) => turn,
            None => self.queue.turn(key, priority).await,
        };
        self.report_budget();
        let started = Instant::now();
        let duration = self.settings.iam_role_session_ttl.duration();
        let call = self.assumer.assume_role(key, duration);
        let result = match tokio::time::timeout(self.settings.sts_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StsError::transient(format!(
                "STS did not answer within {}",
                humantime::format_duration(self.settings.sts_timeout)
            ))),
        };
        self.metrics.sts_duration.observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "success",
            Err(error) if error.failure == Failure::Throttled => "throttled",
            Err(_) => "error",
        };
        self.metrics.sts_calls.get_or_create(&StsLabels { result: outcome }).inc();
        match &result {
            Ok(_) => self.queue.answered(false),
            Err(error) if error.failure == Failure::Throttled => self.queue.answered(true),
            Err(_) => {}
        }
        let credentials = result?;
        tracing::debug!(role = %key.role, session = %key.session_name, "assumed role");
        let refresh_at = refresh_point(
            credentials.expiration,
            self.settings.iam_role_session_ttl.refresh_before(),
            super::refresh::jitter(),
        );
        Ok(Arc::new(Issued::new(credentials, self.clock.now()).refreshed_at(refresh_at)))
    }
}

/// How long a prefetch keeps trying through throttling or STS's own failures: the pod's
/// first request, if it comes meanwhile, takes the fetch over with a request's priority.
const PREFETCH_RETRIES_FOR: Duration = Duration::from_secs(15 * 60);

/// The wait before try `attempt + 1` (`attempt` from 0), "full jitter" (AWS's "Exponential
/// Backoff and Jitter"): uniform up to a ceiling that doubles with each try, capped. Keys of
/// a node, and nodes of a fleet, throttled together spread out instead of coming back
/// together. A request's ceiling starts at 50 ms and stops at 500 ms (its pod's SDK gives up
/// after about a second); a refresh's or prefetch's starts at 1 s and stops at 2 minutes.
pub fn backoff(priority: Priority, attempt: u32, jitter: f64) -> Duration {
    let (base, cap) = match priority {
        Priority::Demand => (Duration::from_millis(50), Duration::from_millis(500)),
        _ => (Duration::from_secs(1), Duration::from_secs(120)),
    };
    let ceiling = base.saturating_mul(1 << attempt.min(16)).min(cap);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    //! On paused time: the fake STS's delays, the timeouts and the waits below are virtual, so
    //! the tests neither sleep nor depend on the machine's speed.

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::credentials::fake::{FakeSts, cache, key, settings, settle};

    #[tokio::test(start_paused = true)]
    async fn credentials_within_their_last_minutes_are_never_handed_out_whatever_moka_keeps() {
        // The clock follows paused time; moka's eviction timer does not, so only the cache's
        // own check stands between a pod and credentials about to expire.
        let clock = Clock::following_tokio();
        let sts = FakeSts::with_clock(Duration::from_secs(3600), Duration::ZERO, clock);
        let settings = settings(Duration::ZERO, Duration::from_secs(2), 4);
        let cache = CredentialCache::with_clock(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()), clock);
        let first = cache.get(&key("ns.pod")).await.unwrap();
        // STS throttles from now on: every refresh fails, and the cached credentials age.
        sts.throttling.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(54 * 60)).await;
        assert_eq!(cache.get(&key("ns.pod")).await.unwrap().credentials, first.credentials, "6 minutes left");
        tokio::time::sleep(Duration::from_secs(2 * 60)).await;
        assert!(cache.get(&key("ns.pod")).await.is_err(), "4 minutes left: never handed out");
        sts.throttling.store(false, Ordering::SeqCst);
        let second = cache.get(&key("ns.pod")).await.unwrap();
        assert_ne!(second.credentials, first.credentials, "fetched again");
        assert!(second.remaining(clock.now()) > Duration::from_secs(55 * 60));
    }

    #[tokio::test(start_paused = true)]
    async fn while_sts_throttles_requests_are_retried_at_a_pace_that_halves() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(10));
        sts.throttling.store(true, Ordering::SeqCst);
        let mut settings = settings(Duration::ZERO, Duration::from_secs(2), 4);
        settings.sts_budget = crate::credentials::BudgetSettings { rate: 10.0, burst: 20.0 };
        let cache = CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()));
        // A new pod a second for a minute, each request waiting up to a second.
        let mut calls = Vec::new();
        for n in 0..60 {
            let started = tokio::time::Instant::now();
            let until = started + Duration::from_secs(1);
            assert!(cache.get_until(&key(&format!("ns.pod-{n}")), until).await.is_err());
            calls.push(sts.calls());
            tokio::time::sleep_until(until).await;
        }
        assert!(calls[0] > 1, "a throttled request is retried at once while the node keeps its pace");
        let late = calls[59] - calls[29];
        assert!(
            late <= 30 + 2,
            "{late} calls for the last 30 requests: a throttled node's retries must come at its halved pace, not multiply its calls"
        );
        assert!(cache.queue.background_pace().unwrap() < 0.1, "the pace halved");
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
    async fn failures_are_remembered_for_the_error_ttl() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        sts.failing.store(true, Ordering::SeqCst);
        let cache = cache(&sts, Duration::from_millis(300));
        let error = cache.get(&key("ns.pod")).await.unwrap_err();
        assert!(error.to_string().contains("AccessDenied"), "{error}");
        cache.get(&key("ns.pod")).await.unwrap_err();
        assert_eq!(sts.calls(), 1, "the failure is remembered");
        sts.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(299)).await;
        cache.get(&key("ns.pod")).await.unwrap_err();
        assert_eq!(sts.calls(), 1, "still within the error TTL");
        tokio::time::sleep(Duration::from_millis(1)).await;
        cache.get(&key("ns.pod")).await.unwrap();
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
    async fn the_sessions_asked_for_in_the_last_minutes_are_prefetched_first() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = cache(&sts, Duration::ZERO); // 4 at once, 1 of them for prefetches
        // What an earlier agent wrote before it crashed.
        cache.recent.seed(vec![("ns.pod-7".into(), SystemTime::now() - Duration::from_secs(300))]);
        for i in 0..10 {
            cache.prefetch(key(&format!("ns.pod-{i}")));
        }
        settle(&sts, 10).await;
        let issued = cache.get(&key("ns.pod-7")).await.unwrap();
        // The first prefetch had the free turn; pod-7 came next, not eighth.
        assert_eq!(issued.credentials.access_key_id, "ASIA1-ns.pod-7");
        assert_eq!(sts.calls(), 10, "served from memory");

        // A request is an ask: that session's next prefetch goes first too.
        assert!(!cache.recent.is_recent("ns.new", SystemTime::now()));
        cache.get(&key("ns.new")).await.unwrap();
        assert!(cache.recent.is_recent("ns.new", SystemTime::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_request_is_tried_again_until_its_deadline_and_never_remembered() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(10));
        let cache = cache(&sts, Duration::from_secs(600));
        sts.throttling.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let error = cache.get_until(&key("ns.pod"), started + Duration::from_secs(2)).await.unwrap_err();
        assert!(error.to_string().contains("Throttling"), "{error}");
        assert!(started.elapsed() <= Duration::from_millis(2100), "{:?}", started.elapsed());
        let tries = sts.calls();
        assert!(tries >= 4, "tried again, backing off: {tries}");
        sts.throttling.store(false, Ordering::SeqCst);
        cache.get(&key("ns.pod")).await.expect("not remembered as a failure for --iam-role-error-ttl");
        assert_eq!(sts.calls(), tries + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_failure_is_not_tried_again() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let cache = cache(&sts, Duration::from_secs(600));
        sts.failing.store(true, Ordering::SeqCst);
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        cache.get_until(&key("ns.pod"), until).await.unwrap_err();
        assert_eq!(sts.calls(), 1, "AccessDenied is final");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_prefetch_backs_off_and_a_request_takes_it_over_at_once() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        crate::credentials::fake::arrives(&cache, "u1", "ns.pod");
        sts.throttling.store(true, Ordering::SeqCst);
        cache.prefetch(key("ns.pod"));
        // Background retries back off over a minute: a handful of calls, not hundreds.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let background = sts.calls();
        assert!((4..=16).contains(&background), "{background} calls in a minute");
        sts.throttling.store(false, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        cache.get(&key("ns.pod")).await.expect("served once STS lets it through");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "not after the prefetch's backoff: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        assert_eq!(backoff(Priority::Demand, 0, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(Priority::Demand, 2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(Priority::Demand, 9, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(Priority::Refresh, 3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(Priority::Prefetch, 40, 1.0), Duration::from_secs(120));
        assert_eq!(backoff(Priority::Prefetch, 40, 0.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn sts_calls_are_limited_in_number_at_once() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = cache(&sts, Duration::ZERO); // 4 at once
        let keys: Vec<CredentialKey> = (0..12).map(|i| key(&format!("ns.pod-{i}"))).collect();
        let started = tokio::time::Instant::now();
        let results = futures::future::join_all(keys.iter().map(|k| cache.get(k))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(sts.calls(), 12);
        assert_eq!(started.elapsed(), Duration::from_millis(300), "12 calls of 100 ms, 4 at a time");

        // Waiting for a turn is not STS being slow: calls of 60 ms, two at a time, with a
        // 100 ms timeout all succeed, though the last waits 300 ms for its turn.
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(60));
        let settings = settings(Duration::ZERO, Duration::from_millis(100), 2);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()));
        let results = futures::future::join_all(keys.iter().map(|k| cache.get(k))).await;
        assert!(results.iter().all(Result::is_ok), "queued calls are not cut off by the call timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_sts_is_cut_off_at_the_timeout() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_secs(10));
        let settings = settings(Duration::ZERO, Duration::from_millis(100), 4);
        let cache = CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()));
        let started = tokio::time::Instant::now();
        let error = cache.get(&key("ns.pod")).await.unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
