//! Test doubles and fixtures for the credential code, defined once: a fake STS, the settings
//! and the cache the tests start from, keys, and waiting for STS on paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{BudgetSettings, CredentialCache, Credentials, RoleAssumer, StsError, StsSettings};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::policy::RoleArn;
use crate::resolve::{CredentialKey, SessionOptions, SessionRules, SessionScope};

/// A fake STS: counts calls, can fail, hands out credentials valid for `validity`.
pub(crate) struct FakeSts {
    pub(crate) calls: AtomicUsize,
    pub(crate) failing: AtomicBool,
    /// Answer `Throttling` (retryable) rather than credentials.
    pub(crate) throttling: AtomicBool,
    validity: Duration,
    delay: Duration,
    /// What expirations are counted from.
    clock: Clock,
}

impl FakeSts {
    pub(crate) fn new(validity: Duration, delay: Duration) -> Arc<Self> {
        Self::with_clock(validity, delay, Clock::System)
    }

    /// The same, its expirations counted from `clock`'s time.
    pub(crate) fn with_clock(validity: Duration, delay: Duration, clock: Clock) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            throttling: AtomicBool::new(false),
            validity,
            delay,
            clock,
        })
    }
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl RoleAssumer for FakeSts {
    fn assume_role<'a>(&'a self, key: &'a CredentialKey, _: Duration) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.throttling.load(Ordering::SeqCst) {
                return Err(StsError::answered(Some("Throttling".into()), "Rate exceeded", Some(400)));
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(StsError::answered(Some("AccessDenied".into()), "no", Some(403)));
            }
            Ok(Credentials {
                access_key_id: format!("ASIA{n}-{}", key.session_name),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: self.clock.now() + self.validity,
            })
        })
    }
}

/// STS settings with 30-minute sessions and these limits.
pub(crate) fn settings(iam_role_error_ttl: Duration, sts_timeout: Duration, sts_concurrency: usize) -> StsSettings {
    StsSettings {
        iam_role_session_ttl: SessionRules::new(Duration::from_secs(1800)),
        iam_role_error_ttl,
        sts_timeout,
        sts_concurrency,
        sts_budget: BudgetSettings { rate: 1e6, burst: 1e6 },
        sessions: SessionOptions::default(),
        use_regional_sts_endpoint: false,
        assume_role_arn: None,
    }
}

pub(crate) fn key(session: &str) -> CredentialKey {
    CredentialKey {
        role: RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap(),
        external_id: None,
        scope: SessionScope::Pod,
        session_name: session.into(),
        tags: None,
        source_identity: None,
    }
}

pub(crate) fn cache(sts: &Arc<FakeSts>, error_ttl: Duration) -> Arc<CredentialCache> {
    let settings = settings(error_ttl, Duration::from_secs(2), 4);
    CredentialCache::new(sts.clone(), settings, Arc::default(), Arc::new(Metrics::new()))
}

/// A pod `uid` on the node under `session`, as the prefetcher reports it.
pub(crate) fn arrives(cache: &CredentialCache, uid: &str, session: &str) {
    cache.liveness.arrived(uid, Some(&session.into()));
}

/// Lets background work run until STS has had `calls` calls (virtual time).
pub(crate) async fn settle(sts: &FakeSts, calls: usize) {
    while sts.calls() < calls {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}
