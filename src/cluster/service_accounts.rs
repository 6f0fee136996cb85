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

use super::Synced;
use super::pod::AnnotationKeys;
use crate::policy::{IRSA_ROLE_ANNOTATION, ServiceAccountLookup, ServiceAccountRole};

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

/// Roles by namespace, then by ServiceAccount name: looked up with borrowed names, so a
/// request allocates nothing to find its pod's ServiceAccount.
type Roles = HashMap<String, HashMap<String, Arc<ServiceAccountRole>>>;

/// The role of every ServiceAccount that names one.
#[derive(Debug, Default)]
pub struct ServiceAccountStore {
    roles: RwLock<Roles>,
    synced: Synced,
}

fn lookup<'a>(roles: &'a Roles, namespace: &str, name: &str) -> Option<&'a Arc<ServiceAccountRole>> {
    roles.get(namespace)?.get(name)
}

fn names(roles: &Roles) -> impl Iterator<Item = (Name, &Arc<ServiceAccountRole>)> {
    roles.iter().flat_map(|(ns, accounts)| accounts.iter().map(|(name, role)| ((ns.clone(), name.clone()), role)))
}

impl ServiceAccountStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What the ServiceAccount `namespace/name` says of its role. Before the first listing
    /// nothing is known, and `None` says so: "no role" would be a wrong answer then.
    pub fn entry(&self, namespace: &str, name: &str) -> Option<ServiceAccountEntry> {
        if !self.synced.is_synced() {
            return None;
        }
        Some(ServiceAccountEntry(lookup(&self.roles.read(), namespace, name).cloned()))
    }

    /// Sets (or, with `None`, clears) a ServiceAccount's role. True when that changed it.
    pub fn set(&self, namespace: &str, name: &str, role: Option<ServiceAccountRole>) -> bool {
        let mut roles = self.roles.write();
        match role {
            Some(role) if lookup(&roles, namespace, name).is_some_and(|old| **old == role) => false,
            Some(role) => {
                roles.entry(namespace.to_string()).or_default().insert(name.to_string(), Arc::new(role));
                true
            }
            None => {
                let Some(accounts) = roles.get_mut(namespace) else { return false };
                let removed = accounts.remove(name).is_some();
                if accounts.is_empty() {
                    roles.remove(namespace);
                }
                removed
            }
        }
    }

    /// Replaces every role with a fresh listing and marks the store synced. Returns the
    /// ServiceAccounts whose role changed (every one named, on the first listing).
    pub fn replace_all(&self, listing: impl IntoIterator<Item = (Name, ServiceAccountRole)>) -> Vec<Name> {
        let mut fresh = Roles::new();
        for ((namespace, name), role) in listing {
            fresh.entry(namespace).or_default().insert(name, Arc::new(role));
        }
        let mut roles = self.roles.write();
        let first = !self.synced.is_synced();
        let mut changed: Vec<Name> = names(&fresh)
            .filter(|((ns, name), role)| first || lookup(&roles, ns, name) != Some(*role))
            .map(|(name, _)| name)
            .collect();
        changed.extend(names(&roles).filter(|((ns, name), _)| lookup(&fresh, ns, name).is_none()).map(|(n, _)| n));
        *roles = fresh;
        drop(roles);
        self.synced.mark();
        changed
    }

    /// Whether the first listing has been applied (see [`Synced`]).
    pub fn synced(&self) -> &Synced {
        &self.synced
    }

    /// Every ServiceAccount that names a role, sorted, for `/debug/store`.
    pub fn snapshot(&self) -> Vec<(String, Arc<ServiceAccountRole>)> {
        let mut all: Vec<_> =
            names(&self.roles.read()).map(|((ns, name), role)| (format!("{ns}/{name}"), role.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// One ServiceAccount's entry in a synced store: its role, or none.
#[derive(Debug, Clone)]
pub struct ServiceAccountEntry(Option<Arc<ServiceAccountRole>>);

impl ServiceAccountEntry {
    /// As [`crate::policy::Policy::assign`] takes it.
    pub fn as_lookup(&self) -> ServiceAccountLookup<'_> {
        match &self.0 {
            Some(role) => ServiceAccountLookup::Role(role),
            None => ServiceAccountLookup::NoRole,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(annotations: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(json!({"name": "web", "namespace": "shop", "annotations": annotations})).unwrap()
    }

    #[test]
    fn the_role_key_comes_before_irsas_annotation() {
        let both = meta(json!({"iam.amazonaws.com/role": " app ", IRSA_ROLE_ANNOTATION: "arn:aws:iam::1:role/irsa"}));
        let role = role_of(&both, &AnnotationKeys::default()).unwrap();
        assert_eq!((role.annotation.as_str(), role.value.as_str()), ("iam.amazonaws.com/role", "app"));
        let irsa = meta(json!({"iam.amazonaws.com/role": " ", IRSA_ROLE_ANNOTATION: "arn:aws:iam::1:role/irsa",
                               "iam.amazonaws.com/external-id": "e-1"}));
        let role = role_of(&irsa, &AnnotationKeys::default()).unwrap();
        assert_eq!((role.annotation.as_str(), role.value.as_str()), (IRSA_ROLE_ANNOTATION, "arn:aws:iam::1:role/irsa"));
        assert_eq!(role.external_id.as_deref(), Some("e-1"));
        assert!(role_of(&meta(json!({"other": "x"})), &AnnotationKeys::default()).is_none());
        assert!(role_of(&meta(json!(null)), &AnnotationKeys::default()).is_none());
    }

    #[test]
    fn nothing_is_known_before_the_first_listing_and_changes_are_reported() {
        let store = ServiceAccountStore::default();
        let role = |value: &str| ServiceAccountRole { annotation: "a".into(), value: value.into(), external_id: None };
        let name = |n: &str| ("shop".to_string(), n.to_string());
        assert!(store.entry("shop", "web").is_none(), "unsynced: no answer, not \"no role\"");
        let changed = store.replace_all([(name("web"), role("app")), (name("batch"), role("batch"))]);
        assert_eq!(changed.len(), 2);
        assert!(
            matches!(store.entry("shop", "web").unwrap().as_lookup(), ServiceAccountLookup::Role(r) if r.value == "app")
        );
        assert_eq!(store.entry("shop", "other").unwrap().as_lookup(), ServiceAccountLookup::NoRole);
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
