//! Which role a pod may have: its annotation, the default role, the base ARN, and the
//! namespace's allow list. Pure: the same inputs always give the same answer, so a denial is
//! final and answered at once rather than retried.

mod arn;
mod discovery;
mod namespace;

use std::fmt;

pub use arn::{ArnError, BaseArn, RoleArn};
pub use discovery::{
    BaseArnSource, BoxError, CallerAccount, DefaultRoleSource, DiscoveryError, NodeMetadata, PolicyError,
    PolicySettings, discover,
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

/// The annotation IRSA (EKS's "IAM roles for service accounts") puts on a ServiceAccount.
pub const IRSA_ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// The role a pod's ServiceAccount names (`--service-account-roles`), as the ServiceAccount
/// watch keeps it: which annotation named it, its value, and the ServiceAccount's external ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountRole {
    /// The annotation that named the role: `--iam-role-key`, else [`IRSA_ROLE_ANNOTATION`].
    pub annotation: String,
    pub value: String,
    /// The ServiceAccount's `--iam-external-id` annotation, used when the pod has none.
    pub external_id: Option<String>,
}

/// What the pod's ServiceAccount says of its role, for [`Policy::assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAccountLookup<'a> {
    /// ServiceAccounts are not consulted (`--service-account-roles` is off).
    NotConsulted,
    /// The ServiceAccount names no role (or does not exist).
    NoRole,
    /// The ServiceAccount names this role.
    Role(&'a ServiceAccountRole),
}

/// Where an assigned role came from, for logs and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSource {
    /// The pod's own `--iam-role-key` annotation.
    Annotation,
    /// The pod's ServiceAccount, through this annotation (`--service-account-roles`).
    ServiceAccount {
        annotation: String,
    },
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
    /// No annotation (on the pod, nor on its ServiceAccount when that is consulted) and no
    /// default role.
    NoRole { service_account: Option<String> },
    /// The annotation could not be turned into a role ARN.
    BadAnnotation { value: String, reason: String },
    /// The ServiceAccount's role annotation could not be turned into a role ARN.
    BadServiceAccountAnnotation { service_account: String, annotation: String, value: String, reason: String },
    /// Namespace restrictions are on and the namespace does not list the role.
    NotAllowedInNamespace { role: RoleArn, namespace: String },
    /// Namespace restrictions are on and the namespace's annotation is malformed.
    BadNamespaceAnnotation { namespace: String, reason: String },
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NoRole { service_account: None } => {
                f.write_str("pod has no role annotation and there is no default role")
            }
            Denial::NoRole { service_account: Some(service_account) } => write!(
                f,
                "neither the pod nor its ServiceAccount {service_account} names a role, and there is no default role"
            ),
            Denial::BadAnnotation { value, reason } => write!(f, "role annotation {value:?} is unusable: {reason}"),
            Denial::BadServiceAccountAnnotation { service_account, annotation, value, reason } => {
                write!(f, "ServiceAccount {service_account}'s {annotation} {value:?} is unusable: {reason}")
            }
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

    /// The role `pod` may use: its own annotation's, else its ServiceAccount's (`service_account`
    /// is what the ServiceAccount names, with `--service-account-roles`), else the default role.
    /// `namespace_rule` is the pod namespace's annotation, if any; it only matters when
    /// restrictions are on, and then its absence allows nothing, whichever the role's source.
    pub fn assign(
        &self,
        pod: &PodIdentity,
        service_account: ServiceAccountLookup<'_>,
        namespace_rule: Option<&NamespaceRule>,
    ) -> Result<Assignment, Denial> {
        let own_external_id = pod.external_id.clone().filter(|id| !id.is_empty());
        let (role, source, external_id) = match pod.own_role() {
            Some(value) => (self.role_from_annotation(value)?, RoleSource::Annotation, own_external_id),
            None => match service_account {
                ServiceAccountLookup::Role(named) => {
                    let role = self.role_from_annotation(&named.value).map_err(|denial| match denial {
                        Denial::BadAnnotation { value, reason } => Denial::BadServiceAccountAnnotation {
                            service_account: format!("{}/{}", pod.namespace, pod.service_account),
                            annotation: named.annotation.clone(),
                            value,
                            reason,
                        },
                        other => other,
                    })?;
                    let external_id = own_external_id.or_else(|| named.external_id.clone().filter(|id| !id.is_empty()));
                    (role, RoleSource::ServiceAccount { annotation: named.annotation.clone() }, external_id)
                }
                ServiceAccountLookup::NotConsulted | ServiceAccountLookup::NoRole => {
                    let consulted = (service_account == ServiceAccountLookup::NoRole)
                        .then(|| format!("{}/{}", pod.namespace, pod.service_account));
                    let role = self.default_role.clone().ok_or(Denial::NoRole { service_account: consulted })?;
                    (role, RoleSource::DefaultRole, own_external_id)
                }
            },
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
        Ok(Assignment { role, external_id, source, allowed_by })
    }
}

/// The policy most tests start from: bare names joined to account 123456789012's roles, no
/// default role, restrictions as given.
#[cfg(test)]
pub(crate) fn test_policy(restrictions: Option<RestrictionFormat>) -> Policy {
    let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
    Policy { base: Some(base), default_role: None, restrictions, account: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        test_policy(None)
    }

    fn pod(role: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: "team-a".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            role_annotation: role.map(Into::into),
            ..PodIdentity::default()
        }
    }

    #[test]
    fn bare_names_join_the_base_and_arns_stay() {
        let p = policy();
        assert_eq!(
            p.assign(&pod(Some("app")), ServiceAccountLookup::NotConsulted, None).unwrap().role.as_str(),
            "arn:aws:iam::123456789012:role/app"
        );
        let full = "arn:aws:iam::999999999999:role/other";
        let assignment = p.assign(&pod(Some(full)), ServiceAccountLookup::NotConsulted, None).unwrap();
        assert_eq!(assignment.role.as_str(), full);
        assert_eq!(assignment.source, RoleSource::Annotation);
    }

    #[test]
    fn no_annotation_uses_the_default_role_or_nothing() {
        let mut p = policy();
        assert_eq!(
            p.assign(&pod(None), ServiceAccountLookup::NotConsulted, None),
            Err(Denial::NoRole { service_account: None })
        );
        assert_eq!(
            p.assign(&pod(Some("  ")), ServiceAccountLookup::NotConsulted, None),
            Err(Denial::NoRole { service_account: None })
        );
        p.default_role = Some(p.base.as_ref().unwrap().join("fallback").unwrap());
        let assignment = p.assign(&pod(None), ServiceAccountLookup::NotConsulted, None).unwrap();
        assert_eq!(assignment.role.name(), "fallback");
        assert_eq!(assignment.source, RoleSource::DefaultRole);
    }

    #[test]
    fn bad_annotations_are_denied_with_the_reason() {
        let mut p = policy();
        assert!(matches!(
            p.assign(&pod(Some("arn:aws:s3:::bucket")), ServiceAccountLookup::NotConsulted, None),
            Err(Denial::BadAnnotation { .. })
        ));
        assert!(matches!(
            p.assign(&pod(Some("two words")), ServiceAccountLookup::NotConsulted, None),
            Err(Denial::BadAnnotation { .. })
        ));
        p.base = None;
        let denial = p.assign(&pod(Some("app")), ServiceAccountLookup::NotConsulted, None).unwrap_err();
        assert!(denial.to_string().contains("--base-role-arn"), "{denial}");
    }

    #[test]
    fn namespace_restrictions_allow_listed_roles_only() {
        let mut p = policy();
        p.restrictions = Some(RestrictionFormat::Glob);
        let rule: NamespaceRule = AllowedRoles::parse(r#"["app*"]"#, RestrictionFormat::Glob, p.base.as_ref(), None);
        let assignment = p.assign(&pod(Some("app-web")), ServiceAccountLookup::NotConsulted, Some(&rule)).unwrap();
        assert_eq!(assignment.allowed_by.as_deref(), Some("app*"));
        assert!(matches!(
            p.assign(&pod(Some("admin")), ServiceAccountLookup::NotConsulted, Some(&rule)),
            Err(Denial::NotAllowedInNamespace { .. })
        ));
        assert!(matches!(
            p.assign(&pod(Some("app-web")), ServiceAccountLookup::NotConsulted, None),
            Err(Denial::NotAllowedInNamespace { .. })
        ));
        let broken: NamespaceRule = AllowedRoles::parse("nope", RestrictionFormat::Glob, p.base.as_ref(), None);
        assert!(matches!(
            p.assign(&pod(Some("app-web")), ServiceAccountLookup::NotConsulted, Some(&broken)),
            Err(Denial::BadNamespaceAnnotation { .. })
        ));
    }

    #[test]
    fn external_id_comes_from_the_pod() {
        let mut with_id = pod(Some("app"));
        with_id.external_id = Some("ext-123".into());
        assert_eq!(
            policy().assign(&with_id, ServiceAccountLookup::NotConsulted, None).unwrap().external_id.as_deref(),
            Some("ext-123")
        );
        with_id.external_id = Some(String::new());
        assert_eq!(policy().assign(&with_id, ServiceAccountLookup::NotConsulted, None).unwrap().external_id, None);
    }

    fn named(annotation: &str, value: &str) -> ServiceAccountRole {
        ServiceAccountRole { annotation: annotation.into(), value: value.into(), external_id: Some("sa-ext".into()) }
    }

    #[test]
    fn the_pods_annotation_wins_then_its_service_accounts_then_the_default_role() {
        let mut p = policy();
        p.default_role = Some(p.base.as_ref().unwrap().join("fallback").unwrap());
        let irsa = named(IRSA_ROLE_ANNOTATION, "arn:aws:iam::123456789012:role/from-sa");
        let own = p.assign(&pod(Some("own")), ServiceAccountLookup::Role(&irsa), None).unwrap();
        assert_eq!((own.role.name(), own.source, own.external_id), ("own", RoleSource::Annotation, None));
        let from_sa = p.assign(&pod(None), ServiceAccountLookup::Role(&irsa), None).unwrap();
        assert_eq!(from_sa.role.name(), "from-sa");
        assert_eq!(from_sa.source, RoleSource::ServiceAccount { annotation: IRSA_ROLE_ANNOTATION.into() });
        assert_eq!(
            from_sa.external_id.as_deref(),
            Some("sa-ext"),
            "the ServiceAccount's external ID goes with its role"
        );
        let fallback = p.assign(&pod(None), ServiceAccountLookup::NoRole, None).unwrap();
        assert_eq!((fallback.role.name(), fallback.source), ("fallback", RoleSource::DefaultRole));
        p.default_role = None;
        let denial = p.assign(&pod(None), ServiceAccountLookup::NoRole, None).unwrap_err();
        assert_eq!(denial, Denial::NoRole { service_account: Some("team-a/web".into()) });
    }

    #[test]
    fn a_service_accounts_role_is_restricted_like_a_pods_and_a_bad_one_names_the_service_account() {
        let mut p = policy();
        p.restrictions = Some(RestrictionFormat::Glob);
        let rule: NamespaceRule = AllowedRoles::parse(r#"["app*"]"#, RestrictionFormat::Glob, p.base.as_ref(), None);
        let allowed = named("iam.amazonaws.com/role", "app-web");
        let assignment = p.assign(&pod(None), ServiceAccountLookup::Role(&allowed), Some(&rule)).unwrap();
        assert_eq!(assignment.allowed_by.as_deref(), Some("app*"));
        let admin = named(IRSA_ROLE_ANNOTATION, "arn:aws:iam::123456789012:role/admin");
        let denial = p.assign(&pod(None), ServiceAccountLookup::Role(&admin), Some(&rule)).unwrap_err();
        assert!(matches!(denial, Denial::NotAllowedInNamespace { .. }), "{denial}");
        let bad = named(IRSA_ROLE_ANNOTATION, "arn:aws:s3:::bucket");
        let denial = p.assign(&pod(None), ServiceAccountLookup::Role(&bad), None).unwrap_err();
        assert!(matches!(denial, Denial::BadServiceAccountAnnotation { .. }), "{denial}");
        assert!(denial.to_string().contains(IRSA_ROLE_ANNOTATION), "{denial}");
    }
}
