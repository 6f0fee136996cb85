//! Roles and policy flags: base ARN, default role, annotations, namespace restrictions,
//! ServiceAccount roles.

use clap::{Args, ValueEnum};

use super::FlagError;
use crate::policy::{BaseArn, BaseArnSource, DefaultRoleSource, PolicySettings, RestrictionFormat, RoleArn};

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Roles and policy")]
pub struct RoleArgs {
    /// ARN prefix joined to bare role names, e.g. `arn:aws:iam::123456789012:role/`.
    #[arg(long)]
    pub base_role_arn: Option<String>,

    /// Discover the base role ARN from the node's instance profile (IMDS `iam/info`).
    #[arg(long)]
    pub auto_discover_base_arn: bool,

    /// Role for pods without the role annotation; none when unset.
    #[arg(long)]
    pub default_role: Option<String>,

    /// Use the node's own instance role as the default role (and discover the base ARN).
    #[arg(long)]
    pub auto_discover_default_role: bool,

    /// Pod annotation that names the role.
    #[arg(long, default_value = "iam.amazonaws.com/role")]
    pub iam_role_key: String,

    /// Pod annotation that holds the external ID passed to AssumeRole.
    #[arg(long, default_value = "iam.amazonaws.com/external-id")]
    pub iam_external_id: String,

    /// Only allow the roles listed in the namespace's `--namespace-key` annotation.
    #[arg(long)]
    pub namespace_restrictions: bool,

    /// How entries of the namespace annotation are matched: `glob` or `regexp` (anchored).
    #[arg(long, value_enum, default_value_t = RestrictionFormatArg::Glob)]
    pub namespace_restriction_format: RestrictionFormatArg,

    /// Namespace annotation that lists the roles its pods may use (a JSON list).
    #[arg(long, default_value = "iam.amazonaws.com/allowed-roles")]
    pub namespace_key: String,

    /// Give a pod without its own role annotation the role its ServiceAccount names: the
    /// `--iam-role-key` annotation, else IRSA's `eks.amazonaws.com/role-arn`. Needs RBAC to
    /// list and watch serviceaccounts.
    #[arg(long)]
    pub service_account_roles: bool,
}

/// `--namespace-restriction-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestrictionFormatArg {
    Glob,
    Regexp,
}

impl RoleArgs {
    pub fn settings(self) -> Result<PolicySettings, FlagError> {
        let flag = |flag: &'static str, message: String| FlagError { flag, message };
        if self.default_role.is_some() && self.auto_discover_default_role {
            return Err(flag("--auto-discover-default-role", "cannot be combined with --default-role; use one".into()));
        }
        // kube2iam's default is the empty string: `--base-role-arn=` means none.
        let base_role_arn = self.base_role_arn.as_deref().map(str::trim).filter(|text| !text.is_empty());
        if base_role_arn.is_some() && self.auto_discover_base_arn {
            return Err(flag("--auto-discover-base-arn", "cannot be combined with --base-role-arn; use one".into()));
        }
        let base_arn = match (base_role_arn, self.auto_discover_base_arn || self.auto_discover_default_role) {
            (Some(text), _) => {
                BaseArnSource::Given(BaseArn::parse(text).map_err(|e| flag("--base-role-arn", e.to_string()))?)
            }
            (None, true) => BaseArnSource::Discover,
            (None, false) => BaseArnSource::None,
        };
        let default_role = match (&self.default_role, self.auto_discover_default_role) {
            (Some(role), _) => DefaultRoleSource::Given(given_default_role(role, &base_arn)?),
            (None, true) => DefaultRoleSource::Discover,
            (None, false) => DefaultRoleSource::None,
        };
        for (name, key) in [
            ("--iam-role-key", &self.iam_role_key),
            ("--iam-external-id", &self.iam_external_id),
            ("--namespace-key", &self.namespace_key),
        ] {
            if key.trim().is_empty() {
                return Err(flag(name, "annotation key is empty".into()));
            }
        }
        Ok(PolicySettings {
            base_role_arn: base_arn,
            default_role,
            iam_role_key: self.iam_role_key,
            iam_external_id: self.iam_external_id,
            namespace_restrictions: self.namespace_restrictions.then_some(match self.namespace_restriction_format {
                RestrictionFormatArg::Glob => RestrictionFormat::Glob,
                RestrictionFormatArg::Regexp => RestrictionFormat::Regexp,
            }),
            namespace_key: self.namespace_key,
            service_account_roles: self.service_account_roles,
        })
    }
}

/// `--default-role`: a full ARN, or a bare name when there will be a base ARN to join.
fn given_default_role(role: &str, base: &BaseArnSource) -> Result<String, FlagError> {
    let error = |message: String| FlagError { flag: "--default-role", message };
    let role = role.trim();
    if role.is_empty() {
        return Err(error("is empty".into()));
    }
    if role.starts_with("arn:") {
        RoleArn::parse(role).map_err(|e| error(e.to_string()))?;
    } else if *base == BaseArnSource::None {
        return Err(error(format!(
            "{role:?} is a bare role name: give a full ARN, or --base-role-arn / --auto-discover-base-arn"
        )));
    }
    Ok(role.to_string())
}
