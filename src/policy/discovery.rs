//! The policy as the flags and the node say it: the base ARN and default role given, or
//! discovered at startup from the node's instance profile, and the node's account.

use futures::future::BoxFuture;

use super::{BaseArn, Policy, RestrictionFormat};
use crate::StartupError;

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
}

/// What discovery reads from the node's metadata service.
pub trait NodeMetadata: Sync {
    /// `GET path`, its body when the answer is 200.
    fn get_text<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<String, String>>;
}

/// Who iamlet's own credentials belong to.
pub trait CallerAccount: Sync {
    /// The account of the credentials iamlet runs with (STS GetCallerIdentity).
    fn caller_account(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// Resolves the base ARN and default role, asking the node's metadata service when told to.
pub async fn discover(
    settings: &PolicySettings,
    node: &dyn NodeMetadata,
    caller: &dyn CallerAccount,
) -> Result<Policy, StartupError> {
    let discovery = |flag, message| StartupError::Discovery { flag, message };
    let base = match &settings.base_role_arn {
        BaseArnSource::None => None,
        BaseArnSource::Given(base) => Some(base.clone()),
        BaseArnSource::Discover => {
            let flag = "--auto-discover-base-arn";
            let base = node_profile_base(node).await.map_err(|message| discovery(flag, message))?;
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
        DefaultRoleSource::Given(role) => Some(
            policy
                .role_from_annotation(role)
                .map_err(|denial| StartupError::Flag { flag: "--default-role", message: denial.to_string() })?,
        ),
        DefaultRoleSource::Discover => {
            let flag = "--auto-discover-default-role";
            let listing = node.get_text("/latest/meta-data/iam/security-credentials/").await;
            let listing = listing.map_err(|message| discovery(flag, message))?;
            let name = listing.lines().next().map(str::trim).filter(|n| !n.is_empty());
            let name = name.ok_or_else(|| discovery(flag, "the node has no instance role".into()))?;
            let role = policy.role_from_annotation(name).map_err(|d| discovery(flag, d.to_string()))?;
            tracing::info!(default_role = role.as_str(), "discovered the default role");
            Some(role)
        }
    };
    Ok(policy)
}

/// The base ARN of the node's instance profile (IMDS `iam/info`): its partition and account.
async fn node_profile_base(node: &dyn NodeMetadata) -> Result<BaseArn, String> {
    let info = node.get_text("/latest/meta-data/iam/info").await?;
    let profile = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("InstanceProfileArn")?.as_str().map(str::to_string))
        .ok_or("iam/info has no InstanceProfileArn: does the node have an instance profile?")?;
    BaseArn::from_instance_profile_arn(&profile).map_err(|e| e.to_string())
}

/// The node's account, which confines namespace entries that name none when there is no
/// base ARN: the instance profile's, else that of iamlet's own credentials. Without one,
/// such entries allow nothing.
async fn node_account(node: &dyn NodeMetadata, caller: &dyn CallerAccount) -> Option<String> {
    let account = match node_profile_base(node).await {
        Ok(base) => Ok(base.account().to_string()),
        Err(profile_error) => {
            caller.caller_account().await.map_err(|sts_error| format!("{profile_error}; {sts_error}"))
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
