//! Session tags (`--session-tags`): the pod's attributes on its AssumeRole call, under the
//! keys EKS Pod Identity uses, so one role serves many tenants through `aws:PrincipalTag`
//! conditions and policies written for Pod Identity work unchanged.

use std::sync::Arc;

use super::SessionScope;
use crate::pod::PodIdentity;

/// The tag keys, as EKS Pod Identity names them.
pub const TAG_CLUSTER_NAME: &str = "eks-cluster-name";
pub const TAG_NAMESPACE: &str = "kubernetes-namespace";
pub const TAG_SERVICE_ACCOUNT: &str = "kubernetes-service-account";
pub const TAG_POD_NAME: &str = "kubernetes-pod-name";
pub const TAG_POD_UID: &str = "kubernetes-pod-uid";
/// Every tag key a session may carry.
pub const TAG_KEYS: [&str; 5] = [TAG_CLUSTER_NAME, TAG_NAMESPACE, TAG_SERVICE_ACCOUNT, TAG_POD_NAME, TAG_POD_UID];

/// STS's limit on a tag value's length.
pub const MAX_TAG_VALUE: usize = 256;

/// One session tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionTag {
    pub key: &'static str,
    pub value: String,
}

/// The tags of one session, in a fixed order. Part of the credential key: a pod recreated
/// under the same name (a StatefulSet's) has another uid, so other credentials.
pub type SessionTags = Arc<[SessionTag]>;

/// Which tags sessions carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTagging {
    /// `--cluster-name`: the `eks-cluster-name` tag, when given.
    pub cluster_name: Option<String>,
}

impl SessionTagging {
    /// The tags of `pod`'s session in `scope`: only what every pod sharing the session shares
    /// (a `service-account` session carries no pod's name or uid, a `role` session only the
    /// cluster's name), so a tag never names one pod of many. `None` when that leaves none.
    /// All of them are passed as transitive, as Pod Identity's are: a pod that chains into
    /// another role (another account's) keeps them.
    pub fn tags(&self, pod: &PodIdentity, scope: SessionScope) -> Option<SessionTags> {
        let mut tags = Vec::with_capacity(5);
        if let Some(cluster) = &self.cluster_name {
            tags.push(SessionTag { key: TAG_CLUSTER_NAME, value: cluster.clone() });
        }
        if scope != SessionScope::Role {
            tags.extend([
                SessionTag { key: TAG_NAMESPACE, value: pod.namespace.clone() },
                SessionTag { key: TAG_SERVICE_ACCOUNT, value: pod.service_account.clone() },
            ]);
        }
        if scope == SessionScope::Pod {
            tags.extend([
                SessionTag { key: TAG_POD_NAME, value: pod.name.clone() },
                SessionTag { key: TAG_POD_UID, value: pod.uid.clone() },
            ]);
        }
        (!tags.is_empty()).then(|| tags.into())
    }
}

/// Whether `value` is a valid session tag value: at most 256 characters of letters, digits,
/// spaces and `_ . : / = + - @`. Kubernetes names and uids always are; `--cluster-name` is
/// checked with this at startup.
pub fn valid_tag_value(value: &str) -> bool {
    value.chars().count() <= MAX_TAG_VALUE
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || (c.is_whitespace() && !c.is_control()) || "_.:/=+-@".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_tags_are_pod_identitys_keys_with_its_values() {
        let pod = PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "0b6b8f4e-1111-2222-3333-444455556666".into(),
            service_account: "web".into(),
            ..PodIdentity::default()
        };
        let tagging = SessionTagging { cluster_name: Some("prod-eu".into()) };
        let tags = tagging.tags(&pod, SessionScope::Pod).unwrap();
        let tags: Vec<(&str, &str)> = tags.iter().map(|t| (t.key, t.value.as_str())).collect();
        assert_eq!(
            tags,
            [
                ("eks-cluster-name", "prod-eu"),
                ("kubernetes-namespace", "shop"),
                ("kubernetes-service-account", "web"),
                ("kubernetes-pod-name", "web-0"),
                ("kubernetes-pod-uid", "0b6b8f4e-1111-2222-3333-444455556666"),
            ]
        );
        let untagged_cluster = SessionTagging { cluster_name: None }.tags(&pod, SessionScope::Pod).unwrap();
        assert!(untagged_cluster.iter().all(|t| t.key != TAG_CLUSTER_NAME));
        assert!(tags.iter().all(|(_, value)| valid_tag_value(value)));
    }

    #[test]
    fn a_shared_session_carries_only_what_its_pods_share() {
        let pod = PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "uid-1".into(),
            service_account: "web".into(),
            ..PodIdentity::default()
        };
        let keys = |tagging: &SessionTagging, scope| -> Option<Vec<&'static str>> {
            tagging.tags(&pod, scope).map(|tags| tags.iter().map(|t| t.key).collect())
        };
        let cluster = SessionTagging { cluster_name: Some("prod".into()) };
        assert_eq!(
            keys(&cluster, SessionScope::ServiceAccount).unwrap(),
            [TAG_CLUSTER_NAME, TAG_NAMESPACE, TAG_SERVICE_ACCOUNT]
        );
        assert_eq!(keys(&cluster, SessionScope::Role).unwrap(), [TAG_CLUSTER_NAME]);
        assert_eq!(keys(&SessionTagging { cluster_name: None }, SessionScope::Role), None, "no tag at all");
    }

    #[test]
    fn tag_values_are_checked_against_stss_rules() {
        assert!(valid_tag_value("prod-eu-1") && valid_tag_value("team a/b:c=d+e@f_g.h"));
        assert!(!valid_tag_value("prod,eu") && !valid_tag_value("a\"b") && !valid_tag_value("a*b"));
        assert!(!valid_tag_value("line\nbreak"));
        assert!(!valid_tag_value(&"x".repeat(257)) && valid_tag_value(&"x".repeat(256)));
    }
}
