//! Which role a pod may have: its annotation, the default role, the base ARN, and the
//! namespace's allow list. Pure: the same inputs always give the same answer, so a denial is
//! final and answered at once rather than retried.

mod arn;
mod discovery;
mod namespace;

use std::fmt;

pub use arn::{ArnError, BaseArn, RoleArn};
pub use discovery::{
    BaseArnSource, BoxError, CallerAccount, DefaultRoleSource, DiscoveryError, NodeMetadata, PolicySettings, discover,
};
pub use namespace::{AllowedRole, AllowedRoles, AnnotationError, KIAM_PERMITTED_ANNOTATION, RestrictionFormat};

use crate::pod::PodIdentity;

/// What the namespace annotation says, as the namespace cache holds it.
pub type NamespaceRule = Result<AllowedRoles, AnnotationError>;

/// The role decisions of one agent, fixed at startup.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Completes bare role names; `None` means annotations must hold full ARNs.
    pub base: Option<BaseArn>,
    /// The role of pods without the annotation.
    pub default_role: Option<RoleArn>,
    /// Whether (and how) namespace allow lists are enforced.
    pub restrictions: Option<RestrictionFormat>,
    /// The node's account: bare namespace entries without a base ARN are confined to it.
    pub account: Option<String>,
}

/// Where an assigned role came from, for logs and `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSource {
    Annotation,
    DefaultRole,
}

/// A pod's allowed role and the parameters its AssumeRole call takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub role: RoleArn,
    pub external_id: Option<String>,
    pub source: RoleSource,
    /// The namespace allow-list entry that matched, when restrictions are on.
    pub allowed_by: Option<String>,
}

/// Why a pod gets no credentials. Shown to the pod (one line) and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No annotation and no default role.
    NoRole,
    /// The annotation could not be turned into a role ARN.
    BadAnnotation { value: String, reason: String },
    /// Namespace restrictions are on and the namespace does not list the role.
    NotAllowedInNamespace { role: RoleArn, namespace: String },
    /// Namespace restrictions are on and the namespace's annotation is malformed.
    BadNamespaceAnnotation { namespace: String, reason: String },
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NoRole => f.write_str("pod has no role annotation and there is no default role"),
            Denial::BadAnnotation { value, reason } => write!(f, "role annotation {value:?} is unusable: {reason}"),
            Denial::NotAllowedInNamespace { role, namespace } => {
                write!(f, "role {role} is not allowed in namespace {namespace}")
            }
            Denial::BadNamespaceAnnotation { namespace, reason } => {
                write!(f, "namespace {namespace} allows no roles: its allowed-roles {reason}")
            }
        }
    }
}

impl Policy {
    /// Turns an annotation value (a bare name or a full ARN) into a role ARN.
    pub fn role_from_annotation(&self, value: &str) -> Result<RoleArn, Denial> {
        let value = value.trim();
        let bad = |reason: String| Denial::BadAnnotation { value: value.to_string(), reason };
        if value.starts_with("arn:") {
            RoleArn::parse(value).map_err(|e| bad(e.to_string()))
        } else if let Some(base) = &self.base {
            base.join(value).map_err(|e| bad(e.to_string()))
        } else {
            Err(bad("a bare role name needs --base-role-arn or --auto-discover-base-arn".into()))
        }
    }

    /// The role `pod` may use. `namespace_rule` is the pod namespace's annotation, if any;
    /// it only matters when restrictions are on, and then its absence allows nothing.
    pub fn assign(&self, pod: &PodIdentity, namespace_rule: Option<&NamespaceRule>) -> Result<Assignment, Denial> {
        let (role, source) = match pod.role_annotation.as_deref().filter(|v| !v.trim().is_empty()) {
            Some(value) => (self.role_from_annotation(value)?, RoleSource::Annotation),
            None => (self.default_role.clone().ok_or(Denial::NoRole)?, RoleSource::DefaultRole),
        };
        let allowed_by = match self.restrictions {
            None => None,
            Some(_) => match namespace_rule {
                Some(Ok(allowed)) => Some(
                    allowed
                        .find(&role)
                        .ok_or_else(|| Denial::NotAllowedInNamespace {
                            role: role.clone(),
                            namespace: pod.namespace.clone(),
                        })?
                        .source
                        .clone(),
                ),
                Some(Err(e)) => {
                    return Err(Denial::BadNamespaceAnnotation {
                        namespace: pod.namespace.clone(),
                        reason: e.to_string(),
                    });
                }
                None => return Err(Denial::NotAllowedInNamespace { role, namespace: pod.namespace.clone() }),
            },
        };
        let external_id = pod.external_id.clone().filter(|id| !id.is_empty());
        Ok(Assignment { role, external_id, source, allowed_by })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            base: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
            default_role: None,
            restrictions: None,
            account: None,
        }
    }

    fn pod(role: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: "team-a".into(),
            name: "web-1".into(),
            role_annotation: role.map(Into::into),
            ..PodIdentity::default()
        }
    }

    #[test]
    fn bare_names_join_the_base_and_arns_stay() {
        let p = policy();
        assert_eq!(p.assign(&pod(Some("app")), None).unwrap().role.as_str(), "arn:aws:iam::123456789012:role/app");
        let full = "arn:aws:iam::999999999999:role/other";
        let assignment = p.assign(&pod(Some(full)), None).unwrap();
        assert_eq!(assignment.role.as_str(), full);
        assert_eq!(assignment.source, RoleSource::Annotation);
    }

    #[test]
    fn no_annotation_uses_the_default_role_or_nothing() {
        let mut p = policy();
        assert_eq!(p.assign(&pod(None), None), Err(Denial::NoRole));
        assert_eq!(p.assign(&pod(Some("  ")), None), Err(Denial::NoRole));
        p.default_role = Some(p.base.as_ref().unwrap().join("fallback").unwrap());
        let assignment = p.assign(&pod(None), None).unwrap();
        assert_eq!(assignment.role.name(), "fallback");
        assert_eq!(assignment.source, RoleSource::DefaultRole);
    }

    #[test]
    fn bad_annotations_are_denied_with_the_reason() {
        let mut p = policy();
        assert!(matches!(p.assign(&pod(Some("arn:aws:s3:::bucket")), None), Err(Denial::BadAnnotation { .. })));
        assert!(matches!(p.assign(&pod(Some("two words")), None), Err(Denial::BadAnnotation { .. })));
        p.base = None;
        let denial = p.assign(&pod(Some("app")), None).unwrap_err();
        assert!(denial.to_string().contains("--base-role-arn"), "{denial}");
    }

    #[test]
    fn namespace_restrictions_allow_listed_roles_only() {
        let mut p = policy();
        p.restrictions = Some(RestrictionFormat::Glob);
        let rule: NamespaceRule = AllowedRoles::parse(r#"["app*"]"#, RestrictionFormat::Glob, p.base.as_ref(), None);
        let assignment = p.assign(&pod(Some("app-web")), Some(&rule)).unwrap();
        assert_eq!(assignment.allowed_by.as_deref(), Some("app*"));
        assert!(matches!(p.assign(&pod(Some("admin")), Some(&rule)), Err(Denial::NotAllowedInNamespace { .. })));
        assert!(matches!(p.assign(&pod(Some("app-web")), None), Err(Denial::NotAllowedInNamespace { .. })));
        let broken: NamespaceRule = AllowedRoles::parse("nope", RestrictionFormat::Glob, p.base.as_ref(), None);
        assert!(matches!(p.assign(&pod(Some("app-web")), Some(&broken)), Err(Denial::BadNamespaceAnnotation { .. })));
    }

    #[test]
    fn external_id_comes_from_the_pod() {
        let mut with_id = pod(Some("app"));
        with_id.external_id = Some("ext-123".into());
        assert_eq!(policy().assign(&with_id, None).unwrap().external_id.as_deref(), Some("ext-123"));
        with_id.external_id = Some(String::new());
        assert_eq!(policy().assign(&with_id, None).unwrap().external_id, None);
    }
}
