//! ServiceAccount roles (`--service-account-roles`): the role each ServiceAccount names, as
//! its watch last saw it, so a pod without its own annotation can be given its
//! ServiceAccount's (the way IRSA-minded teams and Helm charts declare roles).
//!
//! Only ServiceAccounts that name a role are kept, and of them only the two or three strings
//! that matter: a cluster's thousands of ServiceAccounts cost nothing here.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use parking_lot::RwLock;
use tokio::sync::watch;

use super::pod::AnnotationKeys;
use crate::policy::{IRSA_ROLE_ANNOTATION, ServiceAccountRole, ServiceAccountSays};

/// The role a ServiceAccount names: its `--iam-role-key` annotation first, then IRSA's
/// `eks.amazonaws.com/role-arn`; `None` when neither is set (or both are blank).
pub fn role_of(metadata: &ObjectMeta, keys: &AnnotationKeys) -> Option<ServiceAccountRole> {
    let annotations = metadata.annotations.as_ref()?;
    let value = |key: &str| annotations.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    let (annotation, role) =
        [keys.role.as_str(), IRSA_ROLE_ANNOTATION].into_iter().find_map(|key| Some((key, value(key)?)))?;
    Some(ServiceAccountRole {
        annotation: annotation.to_string(),
        value: role.to_string(),
        external_id: value(&keys.external_id).map(str::to_string),
    })
}

/// `(namespace, name)` of a ServiceAccount.
type Name = (String, String);

/// The role of every ServiceAccount that names one.
#[derive(Debug)]
pub struct ServiceAccountStore {
    roles: RwLock<HashMap<Name, Arc<ServiceAccountRole>>>,
    synced: watch::Sender<bool>,
}

impl Default for ServiceAccountStore {
    fn default() -> Self {
        Self { roles: RwLock::default(), synced: watch::channel(false).0 }
    }
}

impl ServiceAccountStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What the ServiceAccount `namespace/name` says of its role. Before the first listing
    /// nothing is known, and `None` says so: "no role" would be a wrong answer then.
    pub fn says(&self, namespace: &str, name: &str) -> Option<ServiceAccountSaid> {
        if !self.is_synced() {
            return None;
        }
        let roles = self.roles.read();
        let role = roles.get(&(namespace.to_string(), name.to_string())).cloned();
        Some(ServiceAccountSaid(role))
    }

    /// Sets (or, with `None`, clears) a ServiceAccount's role. True when that changed it.
    pub fn set(&self, namespace: &str, name: &str, role: Option<ServiceAccountRole>) -> bool {
        let key = (namespace.to_string(), name.to_string());
        let mut roles = self.roles.write();
        match role {
            Some(role) if roles.get(&key).is_some_and(|old| **old == role) => false,
            Some(role) => {
                roles.insert(key, Arc::new(role));
                true
            }
            None => roles.remove(&key).is_some(),
        }
    }

    /// Replaces every role with a fresh listing and marks the store synced. Returns the
    /// ServiceAccounts whose role changed (every one named, on the first listing).
    pub fn replace_all(&self, listing: impl IntoIterator<Item = (Name, ServiceAccountRole)>) -> Vec<Name> {
        let fresh: HashMap<Name, Arc<ServiceAccountRole>> =
            listing.into_iter().map(|(name, role)| (name, Arc::new(role))).collect();
        let mut roles = self.roles.write();
        let first = !self.is_synced();
        let mut changed: Vec<Name> = fresh
            .iter()
            .filter(|(name, role)| first || roles.get(*name) != Some(role))
            .map(|(n, _)| n.clone())
            .collect();
        changed.extend(roles.keys().filter(|name| !fresh.contains_key(*name)).cloned());
        *roles = fresh;
        drop(roles);
        self.synced.send_replace(true);
        changed
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the first listing has been applied.
    pub async fn synced(&self) {
        let _ = self.synced.subscribe().wait_for(|synced| *synced).await;
    }

    /// Every ServiceAccount that names a role, sorted, for `/debug/store`.
    pub fn snapshot(&self) -> Vec<(String, Arc<ServiceAccountRole>)> {
        let mut all: Vec<_> =
            self.roles.read().iter().map(|((ns, name), role)| (format!("{ns}/{name}"), role.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// What a synced store knows of one ServiceAccount's role.
#[derive(Debug, Clone)]
pub struct ServiceAccountSaid(Option<Arc<ServiceAccountRole>>);

impl ServiceAccountSaid {
    /// As [`crate::policy::Policy::assign`] takes it.
    pub fn as_says(&self) -> ServiceAccountSays<'_> {
        match &self.0 {
            Some(role) => ServiceAccountSays::Role(role),
            None => ServiceAccountSays::NoRole,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> AnnotationKeys {
        AnnotationKeys { role: "iam.amazonaws.com/role".into(), external_id: "iam.amazonaws.com/external-id".into() }
    }

    fn meta(annotations: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(json!({"name": "web", "namespace": "shop", "annotations": annotations})).unwrap()
    }

    #[test]
    fn the_role_key_comes_before_irsas_annotation() {
        let both = meta(json!({"iam.amazonaws.com/role": " app ", IRSA_ROLE_ANNOTATION: "arn:aws:iam::1:role/irsa"}));
        let role = role_of(&both, &keys()).unwrap();
        assert_eq!((role.annotation.as_str(), role.value.as_str()), ("iam.amazonaws.com/role", "app"));
        let irsa = meta(json!({"iam.amazonaws.com/role": " ", IRSA_ROLE_ANNOTATION: "arn:aws:iam::1:role/irsa",
                               "iam.amazonaws.com/external-id": "e-1"}));
        let role = role_of(&irsa, &keys()).unwrap();
        assert_eq!((role.annotation.as_str(), role.value.as_str()), (IRSA_ROLE_ANNOTATION, "arn:aws:iam::1:role/irsa"));
        assert_eq!(role.external_id.as_deref(), Some("e-1"));
        assert!(role_of(&meta(json!({"other": "x"})), &keys()).is_none());
        assert!(role_of(&meta(json!(null)), &keys()).is_none());
    }

    #[test]
    fn nothing_is_known_before_the_first_listing_and_changes_are_reported() {
        let store = ServiceAccountStore::default();
        let role = |value: &str| ServiceAccountRole { annotation: "a".into(), value: value.into(), external_id: None };
        let name = |n: &str| ("shop".to_string(), n.to_string());
        assert!(store.says("shop", "web").is_none(), "unsynced: no answer, not \"no role\"");
        let changed = store.replace_all([(name("web"), role("app")), (name("batch"), role("batch"))]);
        assert_eq!(changed.len(), 2);
        assert!(
            matches!(store.says("shop", "web").unwrap().as_says(), ServiceAccountSays::Role(r) if r.value == "app")
        );
        assert_eq!(store.says("shop", "other").unwrap().as_says(), ServiceAccountSays::NoRole);
        assert!(!store.set("shop", "web", Some(role("app"))), "the same role is no change");
        assert!(store.set("shop", "web", Some(role("app-2"))));
        let changed = store.replace_all([(name("web"), role("app-2")), (name("new"), role("n"))]);
        let mut changed: Vec<_> = changed.into_iter().map(|(_, n)| n).collect();
        changed.sort();
        assert_eq!(changed, ["batch", "new"], "only what the re-listing changed");
        assert!(store.set("shop", "new", None));
        assert_eq!(store.snapshot().len(), 1);
    }
}
