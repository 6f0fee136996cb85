//! IAM role ARNs: parsed once, so everything downstream handles a value known to be valid.

use std::fmt;
use std::sync::Arc;

/// Why a text is not a usable role ARN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    #[error("{0:?} is not an IAM role ARN like arn:aws:iam::123456789012:role/name")]
    NotRoleArn(String),
    #[error("{0:?} has an account ID that is not 12 digits")]
    Account(String),
    #[error("{text:?}: role name {name:?} must be 1-64 characters of letters, digits and +=,.@_-")]
    Name { text: String, name: String },
    #[error("{0:?}: role path must be /-separated segments of letters, digits and +=,.@_-")]
    Path(String),
}

/// A validated IAM role ARN, `arn:<partition>:iam::<account>:role/<path/><name>`.
///
/// Cheap to clone: it is a cache key component and travels with every request.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn(Arc<str>);

/// The prefix joined to bare role names: `arn:<partition>:iam::<account>:role/<path/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn(String);

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

/// Splits `arn:<partition>:iam::<account>:role/<rest>` into (prefix through `role/`, rest).
fn split_role_arn(text: &str) -> Result<(&str, &str), ArnError> {
    let not_role = || ArnError::NotRoleArn(text.to_string());
    let mut parts = text.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_role());
    };
    if !partition.starts_with("aws") || !partition.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
        return Err(not_role());
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArnError::Account(text.to_string()));
    }
    let rest = resource.strip_prefix("role/").ok_or_else(not_role)?;
    Ok((&text[..text.len() - rest.len()], rest))
}

fn check_path(text: &str, path: &str) -> Result<(), ArnError> {
    // `path` is what lies between `role/` and the name, each segment followed by `/`.
    if path.split_terminator('/').any(|seg| seg.is_empty() || !seg.chars().all(is_name_char)) {
        return Err(ArnError::Path(text.to_string()));
    }
    Ok(())
}

impl RoleArn {
    /// Parses a full role ARN.
    pub fn parse(text: &str) -> Result<Self, ArnError> {
        let (_, rest) = split_role_arn(text)?;
        let (path, name) = rest.rsplit_once('/').map(|(p, n)| (&rest[..p.len() + 1], n)).unwrap_or(("", rest));
        if name.is_empty() || name.len() > 64 || !name.chars().all(is_name_char) {
            return Err(ArnError::Name { text: text.to_string(), name: name.to_string() });
        }
        check_path(text, path)?;
        Ok(Self(text.into()))
    }

    /// The role's name, the last segment: what IMDS lists under `security-credentials/`.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }

    /// The 12-digit account the role lives in.
    pub fn account(&self) -> &str {
        self.0.split(':').nth(4).unwrap_or_default()
    }

    /// The part after `:role/`: optional path and the name (`team/app`).
    pub fn path_and_name(&self) -> &str {
        self.0.split_once(":role/").map(|(_, rest)| rest).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.0)
    }
}

impl BaseArn {
    /// Parses `arn:aws:iam::123456789012:role/` (the trailing slash may be left out, and a
    /// path may follow `role/`).
    pub fn parse(text: &str) -> Result<Self, ArnError> {
        let text = text.trim();
        let normalized =
            if text.ends_with(":role") || !text.ends_with('/') { format!("{text}/") } else { text.to_string() };
        let (_, path) = split_role_arn(&normalized)?;
        check_path(&normalized, path)?;
        Ok(Self(normalized))
    }

    /// The base ARN of an instance profile's ARN: same partition and account, `role/`.
    ///
    /// `arn:aws:iam::123456789012:instance-profile/path/name` → `arn:aws:iam::123456789012:role/`.
    pub fn from_instance_profile_arn(text: &str) -> Result<Self, ArnError> {
        let not_profile = || ArnError::NotRoleArn(text.to_string());
        let (prefix, _) = text.split_once(":instance-profile/").ok_or_else(not_profile)?;
        Self::parse(&format!("{prefix}:role/"))
    }

    /// The 12-digit account of the base: the node's, when discovered from its profile.
    pub fn account(&self) -> &str {
        self.0.split(':').nth(4).unwrap_or_default()
    }

    /// Joins a bare role name (optionally with a path, `team/app`) to this base.
    pub fn join(&self, name: &str) -> Result<RoleArn, ArnError> {
        RoleArn::parse(&format!("{}{}", self.0, name.trim_start_matches('/')))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_role_arns_with_and_without_path() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
        assert_eq!(arn.name(), "app");
        assert_eq!(arn.path_and_name(), "app");
        let arn = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/a/app-1").unwrap();
        assert_eq!(arn.name(), "app-1");
        assert_eq!(arn.path_and_name(), "team/a/app-1");
    }

    #[test]
    fn refuses_what_is_not_a_role_arn() {
        for bad in [
            "",
            "app",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:user/bob",
            "arn:aws:iam::12345:role/app",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/team//app",
            "arn:aws:iam::123456789012:role/ap p",
            "arn:aws:iam:us-east-1:123456789012:role/app",
            "arn:gcp:iam::123456789012:role/app",
            &format!("arn:aws:iam::123456789012:role/{}", "x".repeat(65)),
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn base_arn_is_normalized_and_joins_names() {
        let base = BaseArn::parse("arn:aws:iam::123456789012:role").unwrap();
        assert_eq!(base.as_str(), "arn:aws:iam::123456789012:role/");
        assert_eq!(base.join("app").unwrap().as_str(), "arn:aws:iam::123456789012:role/app");
        assert_eq!(base.join("/team/app").unwrap().as_str(), "arn:aws:iam::123456789012:role/team/app");
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/team").unwrap();
        assert_eq!(base.join("app").unwrap().as_str(), "arn:aws:iam::123456789012:role/team/app");
        assert!(base.join("bad name").is_err());
        assert!(BaseArn::parse("arn:aws:iam::123456789012:user/").is_err());
    }

    #[test]
    fn base_arn_from_instance_profile() {
        let base =
            BaseArn::from_instance_profile_arn("arn:aws:iam::123456789012:instance-profile/nodes/eks-node").unwrap();
        assert_eq!(base.as_str(), "arn:aws:iam::123456789012:role/");
        assert!(BaseArn::from_instance_profile_arn("arn:aws:iam::123456789012:role/x").is_err());
    }
}
