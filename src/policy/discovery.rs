//! The policy as the flags and the node say it: the base ARN and default role given, or
//! discovered at startup from the node's instance profile, and the node's account.

use futures::future::BoxFuture;

use super::{ArnError, BaseArn, Denial, Policy, RestrictionFormat};

/// An error from outside iamlet (the metadata service, STS), kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why discovery found no answer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path} from the node's metadata service")]
    Metadata {
        path: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("iam/info has no InstanceProfileArn: does the node have an instance profile?")]
    NoInstanceProfile,
    #[error("the node's instance profile ARN is unusable")]
    ProfileArn(#[source] ArnError),
    #[error("the node has no instance role")]
    NoInstanceRole,
    #[error("the node's instance role is unusable: {0}")]
    Role(Denial),
}

const IAM_INFO: &str = "/latest/meta-data/iam/info";
const INSTANCE_ROLES: &str = "/latest/meta-data/iam/security-credentials/";

/// Where the base role ARN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseArnSource {
    /// No base ARN: annotations must hold full ARNs.
    None,
    /// `--base-role-arn`.
    Given(BaseArn),
    /// `--auto-discover-base-arn` or `--auto-discover-default-role`: read from IMDS at startup.
    Discover,
}

/// Where the default role comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRoleSource {
    None,
    /// `--default-role`, a name or an ARN, resolved once the base ARN is known.
    Given(String),
    /// `--auto-discover-default-role`: the node's own instance role.
    Discover,
}

/// The roles and policy flags.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub base_role_arn: BaseArnSource,
    pub default_role: DefaultRoleSource,
    /// Pod annotation naming the role.
    pub iam_role_key: String,
    /// Pod annotation holding the external ID.
    pub iam_external_id: String,
    /// `--namespace-restrictions`, in `--namespace-restriction-format`.
    pub namespace_restrictions: Option<RestrictionFormat>,
    /// Namespace annotation listing the roles its pods may use.
    pub namespace_key: String,
    /// `--service-account-roles`: a pod without its own role annotation gets its
    /// ServiceAccount's (`--iam-role-key`, then `eks.amazonaws.com/role-arn`).
    pub service_account_roles: bool,
}

/// What discovery reads from the node's metadata service.
pub trait NodeMetadata: Sync {
    /// `GET path`, its body when the answer is 200.
    fn get_text<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<String, BoxError>>;
}

/// Why the policy the flags ask for cannot be built: the agent does not start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `--default-role` names no usable role.
    #[error("invalid --default-role: {0}")]
    DefaultRole(Denial),
    /// Discovery through the node's metadata service failed.
    #[error("{flag}")]
    Discovery {
        /// The flag that asked for discovery.
        flag: &'static str,
        #[source]
        source: DiscoveryError,
    },
}

/// Who iamlet's own credentials belong to.
pub trait CallerAccount: Sync {
    /// The account of the credentials iamlet runs with (STS GetCallerIdentity).
    fn caller_account(&self) -> BoxFuture<'_, Result<String, BoxError>>;
}

/// Resolves the base ARN and default role, asking the node's metadata service when told to.
pub async fn discover(
    settings: &PolicySettings,
    node: &dyn NodeMetadata,
    caller: &dyn CallerAccount,
) -> Result<Policy, PolicyError> {
    let discovery = |flag| move |source| PolicyError::Discovery { flag, source };
    let base = match &settings.base_role_arn {
        BaseArnSource::None => None,
        BaseArnSource::Given(base) => Some(base.clone()),
        BaseArnSource::Discover => {
            let flag = "--auto-discover-base-arn";
            let base = node_profile_base(node).await.map_err(discovery(flag))?;
            tracing::info!(base_arn = base.as_str(), "discovered the base role ARN");
            Some(base)
        }
    };
    let account = match (&base, settings.namespace_restrictions) {
        (Some(base), _) => Some(base.account().to_string()),
        (None, None) => None,
        (None, Some(_)) => node_account(node, caller).await,
    };
    let mut policy = Policy { base, default_role: None, restrictions: settings.namespace_restrictions, account };
    policy.default_role = match &settings.default_role {
        DefaultRoleSource::None => None,
        DefaultRoleSource::Given(role) => Some(policy.role_from_annotation(role).map_err(PolicyError::DefaultRole)?),
        DefaultRoleSource::Discover => {
            let flag = "--auto-discover-default-role";
            let listing = node.get_text(INSTANCE_ROLES).await;
            let listing = listing.map_err(|source| DiscoveryError::Metadata { path: INSTANCE_ROLES, source });
            let listing = listing.map_err(discovery(flag))?;
            let name = listing.lines().next().map(str::trim).filter(|n| !n.is_empty());
            let name = name.ok_or(DiscoveryError::NoInstanceRole).map_err(discovery(flag))?;
            let role = policy.role_from_annotation(name).map_err(DiscoveryError::Role).map_err(discovery(flag))?;
            tracing::info!(default_role = role.as_str(), "discovered the default role");
            Some(role)
        }
    };
    tracing::info!(
        base_arn = policy.base.as_ref().map(BaseArn::as_str),
        default_role = policy.default_role.as_ref().map(super::RoleArn::as_str),
        "policy ready"
    );
    Ok(policy)
}

/// The base ARN of the node's instance profile (IMDS `iam/info`): its partition and account.
async fn node_profile_base(node: &dyn NodeMetadata) -> Result<BaseArn, DiscoveryError> {
    let info = node.get_text(IAM_INFO).await.map_err(|source| DiscoveryError::Metadata { path: IAM_INFO, source })?;
    let profile = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("InstanceProfileArn")?.as_str().map(str::to_string))
        .ok_or(DiscoveryError::NoInstanceProfile)?;
    BaseArn::from_instance_profile_arn(&profile).map_err(DiscoveryError::ProfileArn)
}

/// The node's account, which confines namespace entries that name none when there is no
/// base ARN: the instance profile's, else that of iamlet's own credentials. Without one,
/// such entries allow nothing.
async fn node_account(node: &dyn NodeMetadata, caller: &dyn CallerAccount) -> Option<String> {
    let account = match node_profile_base(node).await {
        Ok(base) => Ok(base.account().to_string()),
        Err(profile_error) => {
            let profile_error = crate::describe(&profile_error);
            caller.caller_account().await.map_err(|sts_error| format!("{profile_error}; STS: {sts_error}"))
        }
    };
    match account {
        Ok(account) => {
            tracing::info!(account, "namespace entries without an account are confined to this one");
            Some(account)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot tell the node's account: namespace entries without one allow nothing \
                (give --base-role-arn, or list full role ARNs)");
            None
        }
    }
}
