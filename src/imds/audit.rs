//! The audit trail joining credentials to pods: CloudTrail names the AccessKeyId behind each
//! call and the session's name, and a session can serve more than one pod (a StatefulSet's
//! pod recreated under its name; the shared sessions of a wider scope). One log line per pod
//! and AccessKeyId says which pod was handed which credentials, so whoever reads CloudTrail
//! can find the pod behind any call.
//!
//! A line per pod and AccessKeyId, not per request: a pod's SDK may ask every few seconds
//! (a CLI in a loop), and the join needs one line. The secret key and the session token are
//! never logged.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use crate::pod::PodIdentity;
use crate::resolve::CredentialKey;

/// How long a (pod, AccessKeyId) pair is remembered as logged: longer than any session.
const REMEMBERED: Duration = Duration::from_secs(13 * 3600);
/// Most pairs remembered: pods on a node times a few sessions each, with room to spare.
const CAPACITY: u64 = 100_000;

/// Logs each pod's credentials once (`--credential-audit-log`).
pub struct CredentialAudit {
    logged: Cache<(Arc<str>, Arc<str>), ()>,
}

impl CredentialAudit {
    pub fn new() -> Self {
        Self { logged: Cache::builder().max_capacity(CAPACITY).time_to_live(REMEMBERED).build() }
    }

    /// `pod` was handed the credentials `access_key_id` of `key`: logged at info the first
    /// time for this pod and AccessKeyId, under the target `iamlet::audit`. Returns whether it
    /// was logged now.
    pub async fn handed(&self, pod: &PodIdentity, key: &CredentialKey, access_key_id: &str) -> bool {
        let pair: (Arc<str>, Arc<str>) = (pod.uid.as_str().into(), access_key_id.into());
        let entry = self.logged.entry(pair).or_insert(()).await;
        if !entry.is_fresh() {
            return false;
        }
        tracing::info!(
            target: "iamlet::audit",
            access_key_id,
            namespace = %pod.namespace,
            pod = %pod.name,
            uid = %pod.uid,
            service_account = %pod.service_account,
            role = %key.role,
            session = %key.session_name,
            scope = key.scope.as_str(),
            "credentials handed to a pod"
        );
        true
    }
}

impl Default for CredentialAudit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RoleArn;

    #[tokio::test]
    async fn each_pod_and_access_key_is_logged_once() {
        let audit = CredentialAudit::new();
        let pod = |uid: &str| PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: uid.into(),
            service_account: "web".into(),
            ..PodIdentity::default()
        };
        let key = CredentialKey {
            role: RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap(),
            external_id: None,
            scope: crate::resolve::SessionScope::Pod,
            session_name: "shop.web-0".into(),
            tags: None,
            source_identity: None,
        };
        assert!(audit.handed(&pod("u1"), &key, "ASIA1").await);
        assert!(!audit.handed(&pod("u1"), &key, "ASIA1").await, "asked again: already in the log");
        assert!(audit.handed(&pod("u1"), &key, "ASIA2").await, "refreshed credentials: a new line");
        assert!(audit.handed(&pod("u2"), &key, "ASIA2").await, "the pod recreated under its name shares the session");
    }
}
