//! Which role a pod gets, and the credential key its credentials are fetched and cached
//! under: the one answer the metadata API, the prefetcher and `explain` all ask for, so a role
//! source or a session rule is added here, once.

mod session;

use std::sync::Arc;

pub use session::{MAX_CHAINED_SESSION, SessionRules, session_name};

use crate::cluster::NamespaceStore;
use crate::pod::PodIdentity;
use crate::policy::{Assignment, Denial, NamespaceRule, Policy, RoleArn};

/// What credentials are cached by: the same role with another external ID or for another
/// pod is another session (kube2iam keyed by role alone, #98 #128).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    pub role: RoleArn,
    pub external_id: Option<Arc<str>>,
    pub session_name: Arc<str>,
}

/// A pod's role, and the key of its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub assignment: Assignment,
    pub key: CredentialKey,
}

/// Resolves pods with the agent's policy, the namespaces' allow-lists as the namespace watch
/// last saw them (when restrictions are on), and the session rules.
#[derive(Debug)]
pub struct Resolver {
    policy: Arc<Policy>,
    namespaces: Option<Arc<NamespaceStore>>,
    sessions: SessionRules,
}

impl Resolver {
    pub fn new(policy: Arc<Policy>, namespaces: Option<Arc<NamespaceStore>>, sessions: SessionRules) -> Self {
        Self { policy, namespaces, sessions }
    }

    /// The role `pod` gets and its credential key, or why it gets none. Pure given the
    /// stores' content: a denial is final until the pod or its namespace changes.
    pub fn resolve(&self, pod: &PodIdentity) -> Result<Resolved, Denial> {
        let rule = self.namespace_rule(&pod.namespace);
        let assignment = self.policy.assign(pod, rule.as_deref())?;
        let key = CredentialKey {
            role: assignment.role.clone(),
            external_id: assignment.external_id.as_deref().map(Into::into),
            session_name: self.sessions.name(pod).into(),
        };
        Ok(Resolved { assignment, key })
    }

    /// The allow-list of `namespace`, when restrictions are on and it has one.
    pub fn namespace_rule(&self, namespace: &str) -> Option<Arc<NamespaceRule>> {
        self.namespaces.as_ref()?.rule(namespace)
    }

    pub fn sessions(&self) -> SessionRules {
        self.sessions
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{AllowedRoles, BaseArn, RestrictionFormat};

    fn policy(restrictions: Option<RestrictionFormat>) -> Arc<Policy> {
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        Arc::new(Policy { base: Some(base), default_role: None, restrictions, account: None })
    }

    fn pod(namespace: &str, name: &str, role: &str) -> PodIdentity {
        PodIdentity {
            namespace: namespace.into(),
            name: name.into(),
            role_annotation: Some(role.into()),
            external_id: Some("ext-1".into()),
            ..PodIdentity::default()
        }
    }

    #[test]
    fn the_key_names_the_pod_and_carries_the_role_and_external_id() {
        let resolver = Resolver::new(policy(None), None, SessionRules::new(Duration::from_secs(1800)));
        let resolved = resolver.resolve(&pod("shop", "web-1", "app")).unwrap();
        assert_eq!(resolved.key.role.as_str(), "arn:aws:iam::123456789012:role/app");
        assert_eq!(resolved.key.external_id.as_deref(), Some("ext-1"));
        assert_eq!(&*resolved.key.session_name, "shop.web-1");
        assert_eq!(resolved.assignment.role, resolved.key.role);
    }

    #[test]
    fn namespace_rules_come_from_the_store_as_it_is_now() {
        let policy = policy(Some(RestrictionFormat::Glob));
        let store = NamespaceStore::new();
        let resolver = Resolver::new(policy.clone(), Some(store.clone()), SessionRules::new(Duration::from_secs(1800)));
        assert!(matches!(resolver.resolve(&pod("shop", "web", "app")), Err(Denial::NotAllowedInNamespace { .. })));
        let allowed = AllowedRoles::parse(r#"["app"]"#, RestrictionFormat::Glob, policy.base.as_ref(), None);
        store.set("shop", Some(allowed));
        assert_eq!(resolver.resolve(&pod("shop", "web", "app")).unwrap().assignment.allowed_by.as_deref(), Some("app"));
    }
}
