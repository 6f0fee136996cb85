//! Namespace restrictions: the roles a namespace's pods may use, from a namespace annotation.
//!
//! The annotation holds a JSON list (`["app-*", "arn:aws:iam::123456789012:role/batch"]`).
//! Entries that are not ARNs are joined to the base ARN first, as kube2iam does, so one list
//! works whether pods name their roles bare or in full.

use regex::Regex;

use super::arn::{BaseArn, RoleArn};

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
    /// Compiles an annotation value. `base` completes entries that are not full ARNs.
    pub fn parse(value: &str, format: RestrictionFormat, base: Option<&BaseArn>) -> Result<Self, AnnotationError> {
        let entries: Vec<String> =
            serde_json::from_str(value).map_err(|e| AnnotationError::NotJsonList(e.to_string()))?;
        let entries = entries
            .into_iter()
            .map(|source| {
                let full = match base {
                    Some(base) if !source.starts_with("arn:") => {
                        format!("{}{}", base.as_str(), source.trim_start_matches('/'))
                    }
                    _ => source.clone(),
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
                Ok(AllowedRole { source, matcher })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// The first entry that allows `role`. Without a base ARN, bare entries are matched
    /// against the role's path and name, since there is nothing to complete them with.
    pub fn find(&self, role: &RoleArn) -> Option<&AllowedRole> {
        self.entries.iter().find(|entry| {
            let candidate = |text: &str| match &entry.matcher {
                Matcher::Glob(pattern) => pattern.matches(text),
                Matcher::Regexp(re) => re.is_match(text),
            };
            candidate(role.as_str()) || (!entry.source.starts_with("arn:") && candidate(role.path_and_name()))
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
        let allowed = AllowedRoles::parse(r#"["app-[a-z]+"]"#, RestrictionFormat::Regexp, Some(&base())).unwrap();
        assert!(allowed.find(&role("app-web")).is_some());
        assert!(allowed.find(&role("app-web-admin2")).is_none());
        assert!(allowed.find(&role("xapp-web")).is_none());
    }

    #[test]
    fn without_a_base_bare_entries_match_path_and_name() {
        let allowed = AllowedRoles::parse(r#"["team/*"]"#, RestrictionFormat::Glob, None).unwrap();
        assert!(allowed.find(&role("team/app")).is_some());
        assert!(allowed.find(&role("app")).is_none());
    }

    #[test]
    fn malformed_annotations_are_errors() {
        assert!(matches!(
            AllowedRoles::parse("app-*", RestrictionFormat::Glob, None),
            Err(AnnotationError::NotJsonList(_))
        ));
        assert!(matches!(
            AllowedRoles::parse(r#"["[a"]"#, RestrictionFormat::Glob, None),
            Err(AnnotationError::BadEntry { .. })
        ));
        assert!(matches!(
            AllowedRoles::parse(r#"["("]"#, RestrictionFormat::Regexp, None),
            Err(AnnotationError::BadEntry { .. })
        ));
    }
}
