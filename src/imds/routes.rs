//! Which handler a metadata path goes to. Pure, so the allow-list is tested without I/O.
//!
//! Paths are checked to be canonical before anything else: a path with `..`, `//` or a
//! percent-escape could be normalised by the real IMDS into one the allow-list refused
//! (`/latest/meta-data/placement/../iam/security-credentials/`), so it is refused outright.

use regex::Regex;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `PUT /latest/api/token`: an IMDSv2 session token.
    Token,
    /// `/latest/meta-data/iam/security-credentials` with or without the trailing slash.
    RoleName,
    /// `/latest/meta-data/iam/security-credentials/<role>`.
    Credentials(&'a str),
    /// An allow-listed path, answered by the node's real IMDS.
    Proxy,
    /// Anything else: not served.
    NotAllowed,
    /// Not a canonical path.
    Malformed,
}

impl Route<'_> {
    /// The metrics label of the route (bounded set: never the raw path).
    pub fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::RoleName => "role-name",
            Route::Credentials(_) => "credentials",
            Route::Proxy => "proxy",
            Route::NotAllowed => "not-allowed",
            Route::Malformed => "malformed",
        }
    }
}

const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials";

/// Routes `path` (without the query string).
pub fn classify<'a>(path: &'a str, allow: &Regex) -> Route<'a> {
    if !is_canonical(path) {
        return Route::Malformed;
    }
    if path == "/latest/api/token" {
        return Route::Token;
    }
    if let Some(rest) = path.strip_prefix(CREDENTIALS_PREFIX) {
        return match rest {
            "" | "/" => Route::RoleName,
            _ => match rest[1..].strip_suffix('/').unwrap_or(&rest[1..]) {
                name if rest.starts_with('/') && !name.contains('/') => Route::Credentials(name),
                _ => Route::NotAllowed,
            },
        };
    }
    if allow.is_match(path) { Route::Proxy } else { Route::NotAllowed }
}

/// Absolute, no empty or dot segments (a trailing slash is fine), printable ASCII, no escapes.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let body = rest.strip_suffix('/').unwrap_or(rest);
    path.len() <= 1024
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && (body.is_empty() || body.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::DEFAULT_ALLOW_ROUTE_REGEXP;

    fn route(path: &str) -> Route<'_> {
        classify(path, &Regex::new(DEFAULT_ALLOW_ROUTE_REGEXP).unwrap())
    }

    #[test]
    fn credential_paths_with_and_without_slash() {
        assert_eq!(route("/latest/meta-data/iam/security-credentials"), Route::RoleName);
        assert_eq!(route("/latest/meta-data/iam/security-credentials/"), Route::RoleName);
        assert_eq!(route("/latest/meta-data/iam/security-credentials/app"), Route::Credentials("app"));
        assert_eq!(route("/latest/meta-data/iam/security-credentials/app/"), Route::Credentials("app"));
        assert_eq!(route("/latest/meta-data/iam/security-credentials/a/b"), Route::NotAllowed);
        assert_eq!(route("/latest/meta-data/iam/security-credentialsX"), Route::NotAllowed);
        assert_eq!(route("/latest/api/token"), Route::Token);
    }

    #[test]
    fn default_allow_list_keeps_region_discovery_and_nothing_sensitive() {
        for allowed in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/instance-type",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert_eq!(route(allowed), Route::Proxy, "{allowed}");
        }
        for refused in [
            "/latest/user-data",
            "/latest/meta-data/iam/info",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/meta-data/",
            "/2021-01-03/meta-data/iam/security-credentials/node-role",
            "/latest/meta-data/placement/regionX",
            "/",
        ] {
            assert_eq!(route(refused), Route::NotAllowed, "{refused}");
        }
    }

    #[test]
    fn non_canonical_paths_are_malformed() {
        for bad in [
            "/latest/meta-data/placement/../iam/security-credentials/",
            "/latest/meta-data/placement/./region",
            "/latest//meta-data/placement/region",
            "/latest/meta-data/placement/%72egion",
            "/latest/meta-data/iam/security-credentials/%2e%2e",
            "latest/meta-data",
            "/latest/meta data",
            "/latest\\meta-data",
            "",
        ] {
            assert_eq!(route(bad), Route::Malformed, "{bad:?}");
        }
        assert_eq!(route(&format!("/{}", "a".repeat(2000))), Route::Malformed);
    }
}
