//! Which role a pod gets, and the credential key its credentials are fetched and cached
//! under: the one answer the metadata API, the prefetcher and `explain` all ask for, so a role
//! source or a session rule is added here, once.

mod session;
mod tags;

use std::sync::Arc;

pub use session::{
    MAX_CHAINED_SESSION, SessionRules, SessionScope, scoped_session_name, session_name, session_of, source_identity,
};
pub use tags::{SessionTag, SessionTagging, SessionTags, TAG_KEYS, valid_tag_value};

use crate::cluster::{NamespaceStore, ServiceAccountEntry, ServiceAccountStore};
use crate::pod::PodIdentity;
use crate::policy::{Assignment, Denial, NamespaceRule, Policy, RoleArn, ServiceAccountLookup};

/// What credentials are cached by: the same role with another external ID, for another pod
/// (in `pod` scope) or with other session tags is another session (kube2iam keyed by role
/// alone, #98 #128).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    pub role: RoleArn,
    pub external_id: Option<Arc<str>>,
    /// `--session-scope`: which pods share the session.
    pub scope: SessionScope,
    pub session_name: Arc<str>,
    /// With `--session-tags`: the pod's tags, passed to AssumeRole.
    pub tags: Option<SessionTags>,
    /// With `--source-identity`: `<namespace>@<serviceaccount>`, passed as `SourceIdentity`.
    pub source_identity: Option<Arc<str>>,
}

impl CredentialKey {
    /// The session as the node keeps it alive (its pods, their fetches, the sessions asked
    /// for recently): in `pod` scope the session name, whatever the role, so that a pod whose
    /// role changes leaves no keys behind; in a shared scope the role and the session name
    /// (`<role ARN>#<session name>`), since every role's session on a node has the same name
    /// in `role` scope. No whitespace: the state directory keeps them one per line.
    pub fn session_id(&self) -> Arc<str> {
        match self.scope {
            SessionScope::Pod => self.session_name.clone(),
            _ => format!("{}#{}", self.role, self.session_name).into(),
        }
    }
}

/// What the STS flags make of each pod's session: which pods share it (`--session-scope`),
/// its tags (`--session-tags`) and its `SourceIdentity` (`--source-identity`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    pub scope: SessionScope,
    pub tagging: Option<SessionTagging>,
    /// Never with `role` scope (refused at startup): a session shared by every pod of a role
    /// cannot name one pod's ServiceAccount.
    pub source_identity: bool,
}

/// Why the resolver gives a pod no role now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// Policy's answer: final until the pod, its namespace or its ServiceAccount changes.
    #[error("{0}")]
    Denied(Denial),
    /// A cache the answer depends on has not been listed yet since the agent started: any
    /// answer now could be wrong (the default role instead of a ServiceAccount's), so none is
    /// given. Not final: the request waits for the cache, then is told to retry.
    #[error("the {cache} cache has not synced yet since iamlet started")]
    NotSynced { cache: &'static str },
}

impl From<Denial> for Unresolved {
    fn from(denial: Denial) -> Self {
        Unresolved::Denied(denial)
    }
}

/// A pod's role, and the key of its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub assignment: Assignment,
    pub key: CredentialKey,
}

/// Resolves pods with the agent's policy, the session rules, and (when their flags are on)
/// the namespaces' allow-lists and the ServiceAccounts' roles as their watches last saw them.
#[derive(Debug)]
pub struct Resolver {
    policy: Arc<Policy>,
    /// With `--namespace-restrictions`.
    namespaces: Option<Arc<NamespaceStore>>,
    /// With `--service-account-roles`.
    service_accounts: Option<Arc<ServiceAccountStore>>,
    /// `--session-scope`, `--session-tags`, `--source-identity`.
    sessions: SessionOptions,
    /// The node the pods run on: `role` scope's sessions name it.
    node: Arc<str>,
}

impl Resolver {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy, namespaces: None, service_accounts: None, sessions: SessionOptions::default(), node: "".into() }
    }

    /// The resolver as the agent's flags configure it for the pods of `node`: the agent (fed
    /// by watches) and `iamlet explain` (fed by one read) build it here, so both answer
    /// alike. A store is given when its flag is on (`--namespace-restrictions`,
    /// `--service-account-roles`).
    pub fn configured(
        policy: Arc<Policy>,
        sessions: SessionOptions,
        node: &str,
        namespaces: Option<Arc<NamespaceStore>>,
        service_accounts: Option<Arc<ServiceAccountStore>>,
    ) -> Self {
        Self { policy, namespaces, service_accounts, sessions, node: node.into() }
    }

    /// Sets each session's `SourceIdentity` to the pod's namespace and ServiceAccount
    /// (`--source-identity`).
    pub fn with_source_identity(mut self) -> Self {
        self.sessions.source_identity = true;
        self
    }

    /// Shares sessions among the pods of `node` as `scope` says (`--session-scope`).
    pub fn with_scope(mut self, scope: SessionScope, node: &str) -> Self {
        self.sessions.scope = scope;
        self.node = node.into();
        self
    }

    /// `--session-scope`.
    pub fn scope(&self) -> SessionScope {
        self.sessions.scope
    }

    /// Restricts roles to what each namespace allows (`--namespace-restrictions`).
    pub fn with_namespaces(mut self, store: Arc<NamespaceStore>) -> Self {
        self.namespaces = Some(store);
        self
    }

    /// Gives pods without a role annotation their ServiceAccount's (`--service-account-roles`).
    pub fn with_service_accounts(mut self, store: Arc<ServiceAccountStore>) -> Self {
        self.service_accounts = Some(store);
        self
    }

    /// Tags every session with the pod's attributes (`--session-tags`).
    pub fn with_session_tags(mut self, tagging: SessionTagging) -> Self {
        self.sessions.tagging = Some(tagging);
        self
    }

    /// The role `pod` gets and its credential key, or why it gets none. Pure given the
    /// stores' content: a denial is final until the pod, its namespace or its ServiceAccount
    /// changes, except [`Unresolved::NotSynced`], which only says "not yet".
    pub fn resolve(&self, pod: &PodIdentity) -> Result<Resolved, Unresolved> {
        let entry = match (&self.service_accounts, pod.own_role()) {
            (Some(store), None) => Some(
                store
                    .entry(&pod.namespace, &pod.service_account)
                    .ok_or(Unresolved::NotSynced { cache: "ServiceAccount" })?,
            ),
            _ => None,
        };
        let lookup = entry.as_ref().map_or(ServiceAccountLookup::NotConsulted, ServiceAccountEntry::as_lookup);
        if self.namespaces.as_ref().is_some_and(|store| !store.synced().is_synced()) {
            return Err(Unresolved::NotSynced { cache: "namespace" });
        }
        let rule = self.namespace_rule(&pod.namespace);
        let assignment = self.policy.assign(pod, lookup, rule.as_deref())?;
        let scope = self.sessions.scope;
        let key = CredentialKey {
            role: assignment.role.clone(),
            external_id: assignment.external_id.as_deref().map(Into::into),
            scope,
            session_name: scoped_session_name(scope, pod, &self.node).into(),
            tags: self.sessions.tagging.as_ref().and_then(|tagging| tagging.tags(pod, scope)),
            source_identity: (self.sessions.source_identity && scope != SessionScope::Role)
                .then(|| source_identity(&pod.namespace, &pod.service_account).into()),
        };
        Ok(Resolved { assignment, key })
    }

    /// The session `pod` keeps alive on the node (see [`CredentialKey::session_id`]), given
    /// its resolved `key`: in `pod` scope its own, role or not (a key a request makes later
    /// is the pod's too); in a shared scope its key's, and none without a role.
    pub fn session_id(&self, pod: &PodIdentity, key: Option<&CredentialKey>) -> Option<Arc<str>> {
        match (self.sessions.scope, key) {
            (_, Some(key)) => Some(key.session_id()),
            (SessionScope::Pod, None) => Some(session_of(pod).into()),
            (_, None) => None,
        }
    }

    /// Resolves once every store the answers depend on has been listed since the agent
    /// started.
    pub async fn synced(&self) {
        if let Some(store) = &self.namespaces {
            store.synced().wait().await;
        }
        if let Some(store) = &self.service_accounts {
            store.synced().wait().await;
        }
    }

    /// The allow-list of `namespace`, when restrictions are on and it has one.
    pub fn namespace_rule(&self, namespace: &str) -> Option<Arc<NamespaceRule>> {
        self.namespaces.as_ref()?.rule(namespace)
    }

    /// What the ServiceAccount `namespace/name` names, when ServiceAccounts are consulted
    /// and their store has synced.
    pub fn service_account_role(&self, namespace: &str, name: &str) -> Option<ServiceAccountEntry> {
        self.service_accounts.as_ref()?.entry(namespace, name)
    }

    /// Whether ServiceAccounts are consulted (`--service-account-roles`).
    pub fn consults_service_accounts(&self) -> bool {
        self.service_accounts.is_some()
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::policy::{AllowedRoles, RestrictionFormat, ServiceAccountRole};

    fn policy(restrictions: Option<RestrictionFormat>) -> Arc<Policy> {
        Arc::new(crate::policy::test_policy(restrictions))
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
        let resolver = Resolver::new(policy(None));
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
        let resolver = Resolver::new(policy.clone()).with_namespaces(store.clone());
        assert_eq!(resolver.resolve(&pod("shop", "web", "app")), Err(Unresolved::NotSynced { cache: "namespace" }));
        store.replace_all([]);
        assert!(matches!(
            resolver.resolve(&pod("shop", "web", "app")),
            Err(Unresolved::Denied(Denial::NotAllowedInNamespace { .. }))
        ));
        let allowed = AllowedRoles::parse(r#"["app"]"#, RestrictionFormat::Glob, policy.base.as_ref(), None);
        store.set("shop", Some(allowed));
        assert_eq!(resolver.resolve(&pod("shop", "web", "app")).unwrap().assignment.allowed_by.as_deref(), Some("app"));
    }

    #[test]
    fn a_pod_without_a_role_waits_for_the_service_accounts_and_then_follows_its_own() {
        let mut policy = (*policy(None)).clone();
        policy.default_role = Some(policy.base.as_ref().unwrap().join("node-default").unwrap());
        let store = ServiceAccountStore::new();
        let resolver = Resolver::new(Arc::new(policy)).with_service_accounts(store.clone());
        let mut unannotated = pod("shop", "web", "");
        unannotated.service_account = "web-sa".into();
        assert_eq!(
            resolver.resolve(&unannotated),
            Err(Unresolved::NotSynced { cache: "ServiceAccount" }),
            "before the ServiceAccounts are listed, the default role would be a guess"
        );
        assert_eq!(resolver.resolve(&pod("shop", "web", "own")).unwrap().key.role.name(), "own");
        let irsa = ServiceAccountRole {
            annotation: "eks.amazonaws.com/role-arn".into(),
            value: "arn:aws:iam::123456789012:role/web-irsa".into(),
            external_id: None,
        };
        store.replace_all([(("shop".into(), "web-sa".into()), irsa)]);
        let resolved = resolver.resolve(&unannotated).unwrap();
        assert_eq!(resolved.key.role.name(), "web-irsa");
        assert_eq!(resolved.key.external_id.as_deref(), Some("ext-1"), "the pod's own external ID first");
        store.set("shop", "web-sa", None);
        assert_eq!(resolver.resolve(&unannotated).unwrap().key.role.name(), "node-default");
    }

    #[test]
    fn with_session_tags_a_recreated_pod_has_another_key() {
        let resolver =
            Resolver::new(policy(None)).with_session_tags(SessionTagging { cluster_name: Some("prod".into()) });
        let mut first = pod("shop", "web-0", "app");
        first.uid = "uid-1".into();
        let mut recreated = first.clone();
        recreated.uid = "uid-2".into();
        let (a, b) = (resolver.resolve(&first).unwrap().key, resolver.resolve(&recreated).unwrap().key);
        assert_eq!(a.session_name, b.session_name);
        assert_ne!(a, b, "the uid tag differs, so the credentials do");
        let tags = a.tags.unwrap();
        assert!(tags.iter().any(|t| t.key == "kubernetes-pod-uid" && t.value == "uid-1"));
        assert_eq!(Resolver::new(policy(None)).resolve(&first).unwrap().key.tags, None);
    }

    #[test]
    fn in_a_shared_scope_pods_share_a_key_and_a_session_that_names_no_pod() {
        let node = "node-a";
        let tagging = SessionTagging { cluster_name: Some("prod".into()) };
        let pods: Vec<PodIdentity> = [("web-0", "u1", "web"), ("web-1", "u2", "web"), ("db-0", "u3", "db")]
            .into_iter()
            .map(|(name, uid, service_account)| PodIdentity {
                uid: uid.into(),
                service_account: service_account.into(),
                ..pod("shop", name, "app")
            })
            .collect();
        let keys = |scope| -> Vec<CredentialKey> {
            let resolver = Resolver::new(policy(None)).with_session_tags(tagging.clone()).with_scope(scope, node);
            pods.iter().map(|pod| resolver.resolve(pod).unwrap().key).collect()
        };
        let by_pod = keys(SessionScope::Pod);
        assert!(by_pod[0] != by_pod[1] && by_pod[1] != by_pod[2], "one session per pod");
        let by_account = keys(SessionScope::ServiceAccount);
        assert_eq!(by_account[0], by_account[1], "web-0 and web-1 run as web");
        assert_ne!(by_account[0], by_account[2], "db-0 runs as db");
        assert_eq!(&*by_account[0].session_name, "shop@web");
        assert!(by_account[0].tags.as_ref().unwrap().iter().all(|t| t.key != "kubernetes-pod-name"));
        let by_role = keys(SessionScope::Role);
        assert!(by_role[0] == by_role[1] && by_role[1] == by_role[2], "one role, one session");
        assert_eq!(&*by_role[0].session_name, "iamlet@node-a");
        assert_eq!(by_role[0].session_id().as_ref(), "arn:aws:iam::123456789012:role/app#iamlet@node-a");
        assert_eq!(by_pod[0].session_id().as_ref(), "shop.web-0");
        let with_identity = Resolver::new(policy(None)).with_source_identity();
        let role_scoped = with_identity.with_scope(SessionScope::Role, node);
        assert_eq!(role_scoped.resolve(&pods[0]).unwrap().key.source_identity, None, "no one pod's identity");
    }

    #[test]
    fn a_pod_without_a_role_keeps_a_session_alive_only_in_pod_scope() {
        let mut unannotated = pod("shop", "web-0", "");
        unannotated.role_annotation = None;
        let resolver = Resolver::new(policy(None));
        assert_eq!(resolver.session_id(&unannotated, None).as_deref(), Some("shop.web-0"));
        let shared = Resolver::new(policy(None)).with_scope(SessionScope::ServiceAccount, "n");
        assert_eq!(shared.session_id(&unannotated, None), None);
    }

    #[test]
    fn with_source_identity_the_key_names_the_namespace_and_service_account() {
        let mut web = pod("shop", "web-0", "app");
        web.service_account = "web".into();
        assert_eq!(Resolver::new(policy(None)).resolve(&web).unwrap().key.source_identity, None);
        let key = Resolver::new(policy(None)).with_source_identity().resolve(&web).unwrap().key;
        assert_eq!(key.source_identity.as_deref(), Some("shop@web"));
    }
}
