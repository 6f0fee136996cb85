//! Test doubles for the credential code: a fake STS and the settings tests start from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::{Credentials, RoleAssumer, StsError, StsSettings};
use crate::resolve::{CredentialKey, SessionRules};

/// A fake STS: counts calls, can fail, hands out credentials valid for `validity`.
pub(crate) struct FakeSts {
    pub(crate) calls: AtomicUsize,
    pub(crate) failing: AtomicBool,
    validity: Duration,
    delay: Duration,
}

impl FakeSts {
    pub(crate) fn new(validity: Duration, delay: Duration) -> Arc<Self> {
        Arc::new(Self { calls: AtomicUsize::new(0), failing: AtomicBool::new(false), validity, delay })
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
            if self.failing.load(Ordering::SeqCst) {
                return Err(StsError { code: Some("AccessDenied".into()), message: "no".into() });
            }
            Ok(Credentials {
                access_key_id: format!("ASIA{n}-{}", key.session_name),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: SystemTime::now() + self.validity,
            })
        })
    }
}

/// STS settings with 30-minute sessions and these limits.
pub(crate) fn settings(iam_role_error_ttl: Duration, sts_timeout: Duration, sts_concurrency: usize) -> StsSettings {
    StsSettings {
        sessions: SessionRules::new(Duration::from_secs(1800)),
        iam_role_error_ttl,
        sts_timeout,
        sts_concurrency,
        use_regional_sts_endpoint: false,
        session_tags: None,
        assume_role_arn: None,
    }
}
