//! Namespace allow lists (`--namespace-restrictions`), compiled once per namespace update.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::Synced;
use crate::policy::{
    AllowedRoles, BaseArn, KIAM_PERMITTED_ANNOTATION, NamespaceRule, Policy, PolicySettings, RestrictionFormat,
};
use k8s_openapi::api::core::v1::Namespace;

/// How namespace annotations are read.
#[derive(Debug, Clone)]
pub struct NamespaceRules {
    pub annotation: String,
    pub format: RestrictionFormat,
    pub base: Option<BaseArn>,
    /// The node's account, confining bare entries when there is no base ARN.
    pub account: Option<String>,
}

impl NamespaceRules {
    /// How the agent reads namespaces, from its flags and the policy discovered at startup:
    /// `None` without `--namespace-restrictions`.
    pub fn configured(settings: &PolicySettings, policy: &Policy) -> Option<Self> {
        settings.namespace_restrictions.map(|format| NamespaceRules {
            annotation: settings.namespace_key.clone(),
            format,
            base: policy.base.clone(),
            account: policy.account.clone(),
        })
    }

    /// The rule a namespace object carries: its `--namespace-key` list and kiam's `permitted`
    /// expression together, or `None` when it has neither. Either one malformed makes the
    /// whole rule malformed (the namespace then allows nothing).
    pub fn rule_of(&self, namespace: &Namespace) -> Option<NamespaceRule> {
        let annotations = namespace.metadata.annotations.as_ref()?;
        let (listed, permitted) = (annotations.get(&self.annotation), annotations.get(KIAM_PERMITTED_ANNOTATION));
        if listed.is_none() && permitted.is_none() {
            return None;
        }
        let account = self.account.as_deref();
        let listed = match listed {
            Some(value) => AllowedRoles::parse(value, self.format, self.base.as_ref(), account),
            None => Ok(AllowedRoles::default()),
        };
        Some(listed.and_then(|allowed| match permitted {
            Some(expression) => allowed.with_kiam_permitted(expression, account),
            None => Ok(allowed),
        }))
    }
}

/// The compiled rule of every annotated namespace.
#[derive(Debug, Default)]
pub struct NamespaceStore {
    rules: RwLock<HashMap<String, Arc<NamespaceRule>>>,
    synced: Synced,
}

impl NamespaceStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The namespace's rule; `None` if it has no annotation (or is not known yet).
    pub fn rule(&self, namespace: &str) -> Option<Arc<NamespaceRule>> {
        self.rules.read().get(namespace).cloned()
    }

    /// Sets (or, with `None`, clears) a namespace's rule.
    pub fn set(&self, namespace: &str, rule: Option<NamespaceRule>) {
        let mut rules = self.rules.write();
        match rule {
            Some(rule) => rules.insert(namespace.to_string(), Arc::new(rule)),
            None => rules.remove(namespace),
        };
    }

    /// Replaces every rule with a fresh listing and marks the store synced.
    pub fn replace_all(&self, listing: impl IntoIterator<Item = (String, NamespaceRule)>) {
        let fresh = listing.into_iter().map(|(name, rule)| (name, Arc::new(rule))).collect();
        *self.rules.write() = fresh;
        self.synced.mark();
    }

    /// Whether the first listing has been applied (see [`Synced`]).
    pub fn synced(&self) -> &Synced {
        &self.synced
    }

    /// Names and rules of all annotated namespaces, sorted, for `/debug/store`.
    pub fn snapshot(&self) -> Vec<(String, Arc<NamespaceRule>)> {
        let mut all: Vec<_> = self.rules.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_annotation_of_a_namespace() {
        let rules = NamespaceRules {
            annotation: "iam.amazonaws.com/allowed-roles".into(),
            format: RestrictionFormat::Glob,
            base: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            account: None,
        };
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "a",
            "annotations": {"iam.amazonaws.com/allowed-roles": "[\"app-*\"]"}}}))
        .unwrap();
        let rule = rules.rule_of(&ns).unwrap().unwrap();
        assert_eq!(rule.entries[0].source, "app-*");
        let bare: Namespace = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        assert!(rules.rule_of(&bare).is_none());

        let store = NamespaceStore::default();
        store.replace_all([("a".to_string(), Ok(rule))]);
        assert!(store.synced().is_synced() && store.rule("a").is_some() && store.rule("b").is_none());
        store.set("a", None);
        assert!(store.rule("a").is_none());
    }
}
