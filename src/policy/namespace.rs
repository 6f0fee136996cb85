//! Namespace restrictions: the roles a namespace's pods may use, from a namespace annotation.
//!
//! The annotation holds a JSON list (`["app-*", "arn:aws:iam::123456789012:role/batch"]`).
//! Entries that are not ARNs are joined to the base ARN first, as kube2iam does, so one list
//! works whether pods name their roles bare or in full.
//!
//! An entry without an account never reaches into another account: without a base ARN it
//! matches only roles in the node's account (discovered at startup), and with no account
//! known it matches nothing. A glob's `*` and `?` stop at `/`, so `app-*` does not match a
//! role under another path (`app-x/admin`).

use regex::Regex;

use super::arn::{BaseArn, RoleArn};

/// kiam's namespace annotation: one regular expression over the roles the namespace's pods
/// may use. Honoured beside the `--namespace-key` list, so kiam's namespaces keep working.
pub const KIAM_PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// `--namespace-restriction-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestrictionFormat {
    /// Shell globs (`*`, `?`, `[...]`), matched against the whole ARN.
    Glob,
    /// Regular expressions, anchored at both ends, matched against the whole ARN.
    Regexp,
}

/// One compiled entry of a namespace's allow list.
#[derive(Debug, Clone)]
pub struct AllowedRole {
    /// The entry as written in the annotation, for explanations.
    pub source: String,
    matcher: Matcher,
    scope: Scope,
}

/// What an entry is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// The whole role ARN (an ARN entry, or a bare one joined to the base).
    Arn,
    /// Path and name, of roles in this account only (a bare entry, no base ARN).
    Account(String),
    /// kiam's `permitted` expression: the role's path and name, or its whole ARN, of roles in
    /// this account only.
    NameOrArnInAccount(String),
    /// Nothing: a bare entry with no account to confine it to.
    Nowhere,
}

#[derive(Debug, Clone)]
enum Matcher {
    Glob(glob::Pattern),
    Regexp(Regex),
}

/// A namespace's allow list, compiled once per namespace update rather than per request.
#[derive(Debug, Clone, Default)]
pub struct AllowedRoles {
    pub entries: Vec<AllowedRole>,
}

/// Why an annotation could not be compiled; the namespace then allows nothing (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation is not a JSON list of strings: {0}")]
    NotJsonList(String),
    #[error("entry {entry:?} is not a valid {format}: {message}")]
    BadEntry { entry: String, format: &'static str, message: String },
}

impl AllowedRoles {
    /// Compiles an annotation value. `base` completes entries that are not full ARNs; without
    /// it they are confined to `account` (the node's), or match nothing.
    pub fn parse(
        value: &str,
        format: RestrictionFormat,
        base: Option<&BaseArn>,
        account: Option<&str>,
    ) -> Result<Self, AnnotationError> {
        let entries: Vec<String> =
            serde_json::from_str(value).map_err(|e| AnnotationError::NotJsonList(e.to_string()))?;
        let entries = entries
            .into_iter()
            .map(|source| {
                let (full, scope) = match (source.starts_with("arn:"), base, account) {
                    (true, _, _) => (source.clone(), Scope::Arn),
                    (false, Some(base), _) => {
                        (format!("{}{}", base.as_str(), source.trim_start_matches('/')), Scope::Arn)
                    }
                    (false, None, Some(account)) => (source.clone(), Scope::Account(account.to_string())),
                    (false, None, None) => (source.clone(), Scope::Nowhere),
                };
                let matcher =
                    match format {
                        RestrictionFormat::Glob => glob::Pattern::new(&full).map(Matcher::Glob).map_err(|e| {
                            AnnotationError::BadEntry { entry: source.clone(), format: "glob", message: e.to_string() }
                        })?,
                        RestrictionFormat::Regexp => Regex::new(&format!("^(?:{full})$"))
                            .map(Matcher::Regexp)
                            .map_err(|e| AnnotationError::BadEntry {
                                entry: source.clone(),
                                format: "regexp",
                                message: e.to_string(),
                            })?,
                    };
                Ok(AllowedRole { source, matcher, scope })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Adds kiam's `permitted` expression, anchored whole (`^(?:…)$`; kiam's own `^…$` would
    /// let `a|b` match anything ending in `b`). It matches a role's path and name, or its ARN,
    /// in the node's `account` only, and nothing when that account is unknown: a regexp
    /// cannot say which account it means, so it never reaches into another.
    pub fn with_kiam_permitted(mut self, expression: &str, account: Option<&str>) -> Result<Self, AnnotationError> {
        let source = format!("{KIAM_PERMITTED_ANNOTATION}: {expression}");
        let matcher = Regex::new(&format!("^(?:{expression})$")).map(Matcher::Regexp).map_err(|e| {
            AnnotationError::BadEntry { entry: expression.to_string(), format: "regexp", message: e.to_string() }
        })?;
        let scope = account.map_or(Scope::Nowhere, |account| Scope::NameOrArnInAccount(account.to_string()));
        self.entries.push(AllowedRole { source, matcher, scope });
        Ok(self)
    }

    /// The first entry that allows `role`.
    pub fn find(&self, role: &RoleArn) -> Option<&AllowedRole> {
        const SEPARATED: glob::MatchOptions = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.entries.iter().find(|entry| {
            let candidate = |text: &str| match &entry.matcher {
                Matcher::Glob(pattern) => pattern.matches_with(text, SEPARATED),
                Matcher::Regexp(re) => re.is_match(text),
            };
            match &entry.scope {
                Scope::Arn => candidate(role.as_str()),
                Scope::Account(account) => role.account() == account && candidate(role.path_and_name()),
                Scope::NameOrArnInAccount(account) => {
                    role.account() == account && (candidate(role.path_and_name()) || candidate(role.as_str()))
                }
                Scope::Nowhere => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()
    }

    fn role(name: &str) -> RoleArn {
        base().join(name).unwrap()
    }

    #[test]
    fn glob_entries_are_joined_to_the_base() {
        let allowed = AllowedRoles::parse(
            r#"["app-*", "arn:aws:iam::123456789012:role/batch"]"#,
            RestrictionFormat::Glob,
            Some(&base()),
            None,
        )
        .unwrap();
        assert_eq!(allowed.find(&role("app-web")).unwrap().source, "app-*");
        assert_eq!(allowed.find(&role("batch")).unwrap().source, "arn:aws:iam::123456789012:role/batch");
        assert!(allowed.find(&role("admin")).is_none());
        let other_account = RoleArn::parse("arn:aws:iam::999999999999:role/app-web").unwrap();
        assert!(allowed.find(&other_account).is_none());
    }

    #[test]
    fn regexp_entries_are_anchored() {
        let allowed = AllowedRoles::parse(r#"["app-[a-z]+"]"#, RestrictionFormat::Regexp, Some(&base()), None).unwrap();
        assert!(allowed.find(&role("app-web")).is_some());
        assert!(allowed.find(&role("app-web-admin2")).is_none());
        assert!(allowed.find(&role("xapp-web")).is_none());
    }

    #[test]
    fn without_a_base_bare_entries_match_the_nodes_account_only() {
        let allowed =
            AllowedRoles::parse(r#"["team/*"]"#, RestrictionFormat::Glob, None, Some("123456789012")).unwrap();
        assert!(allowed.find(&role("team/app")).is_some());
        assert!(allowed.find(&role("app")).is_none());
        let elsewhere = RoleArn::parse("arn:aws:iam::999999999999:role/team/app").unwrap();
        assert!(allowed.find(&elsewhere).is_none(), "the same name in another account");
        let regexp =
            AllowedRoles::parse(r#"["app-.*"]"#, RestrictionFormat::Regexp, None, Some("123456789012")).unwrap();
        assert!(regexp.find(&role("app-x")).is_some());
        assert!(regexp.find(&RoleArn::parse("arn:aws:iam::999999999999:role/app-x").unwrap()).is_none());
    }

    #[test]
    fn with_no_account_known_bare_entries_match_nothing() {
        let allowed = AllowedRoles::parse(r#"["app-*", "*"]"#, RestrictionFormat::Glob, None, None).unwrap();
        assert!(allowed.find(&role("app-x")).is_none());
        assert!(allowed.find(&RoleArn::parse("arn:aws:iam::999999999999:role/app-x").unwrap()).is_none());
        let explicit =
            AllowedRoles::parse(r#"["arn:aws:iam::999999999999:role/app-*"]"#, RestrictionFormat::Glob, None, None)
                .unwrap();
        assert!(
            explicit.find(&RoleArn::parse("arn:aws:iam::999999999999:role/app-x").unwrap()).is_some(),
            "an ARN names its account"
        );
    }

    #[test]
    fn kiams_permitted_expression_matches_names_or_arns_in_the_nodes_account_only() {
        let permitted = AllowedRoles::default().with_kiam_permitted("app-.*|batch", Some("123456789012")).unwrap();
        assert!(permitted.find(&role("app-web")).is_some());
        assert!(permitted.find(&role("batch")).is_some());
        assert!(permitted.find(&role("nightly-batch")).is_none(), "anchored around the whole alternation");
        assert!(permitted.find(&role("admin")).is_none());
        let by_arn =
            AllowedRoles::default().with_kiam_permitted("arn:aws:iam::123456789012:role/app-.*", Some("123456789012"));
        assert!(by_arn.unwrap().find(&role("app-web")).is_some());
        let elsewhere = RoleArn::parse("arn:aws:iam::999999999999:role/app-web").unwrap();
        assert!(permitted.find(&elsewhere).is_none(), "never another account");
        let everything = AllowedRoles::default().with_kiam_permitted(".*", Some("123456789012")).unwrap();
        assert!(everything.find(&elsewhere).is_none(), "not even with .*");
        let unknown = AllowedRoles::default().with_kiam_permitted(".*", None).unwrap();
        assert!(unknown.find(&role("app-web")).is_none(), "no account known: nothing");
        assert!(AllowedRoles::default().with_kiam_permitted("app-(", Some("123456789012")).is_err());
    }

    #[test]
    fn glob_stars_do_not_cross_path_separators() {
        let allowed = AllowedRoles::parse(r#"["app-*"]"#, RestrictionFormat::Glob, Some(&base()), None).unwrap();
        assert!(allowed.find(&role("app-web")).is_some());
        assert!(allowed.find(&role("app-web/admin")).is_none());
        let pathed = AllowedRoles::parse(r#"["team/*"]"#, RestrictionFormat::Glob, Some(&base()), None).unwrap();
        assert!(pathed.find(&role("team/app")).is_some());
        assert!(pathed.find(&role("team/inner/admin")).is_none());
    }

    #[test]
    fn malformed_annotations_are_errors() {
        assert!(matches!(
            AllowedRoles::parse("app-*", RestrictionFormat::Glob, None, None),
            Err(AnnotationError::NotJsonList(_))
        ));
        assert!(matches!(
            AllowedRoles::parse(r#"["[a"]"#, RestrictionFormat::Glob, None, None),
            Err(AnnotationError::BadEntry { .. })
        ));
        assert!(matches!(
            AllowedRoles::parse(r#"["("]"#, RestrictionFormat::Regexp, None, None),
            Err(AnnotationError::BadEntry { .. })
        ));
    }
}
