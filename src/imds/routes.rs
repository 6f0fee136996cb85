//! Which handler a metadata path goes to, and what may ever be relayed. Pure, so the relay
//! policy is tested without I/O.
//!
//! Three rules, in this order, whatever `--allow-route-regexp` says:
//!
//! 1. Paths are canonical or refused: a path with `..`, `//` or a percent-escape could be
//!    normalised by the real IMDS into one the rules below refused.
//! 2. The credential routes are iamlet's, under **every** version prefix (`/latest`,
//!    `/2016-09-02`, `/1.0`...): IMDS answers `iam/security-credentials/` under each of them,
//!    so relaying any one would hand out the node's role.
//! 3. What identifies or empowers the node is never relayed, under any prefix and in any
//!    letter case: `meta-data/identity-credentials/`, `user-data`, the signed identity
//!    documents (`dynamic/instance-identity/{pkcs7,signature,rsa2048}`, enough to log in to
//!    Vault's AWS auth as the node), the node's instance profile (`meta-data/iam/info`), and
//!    the real IMDS's `api/token`.
//!
//! Only then is the allow-list consulted, matched against the whole path (anchored), so an
//! operator's regexp can only add harmless paths.

use regex::Regex;

/// Paths pods may read from the node's real metadata service, under `/latest` or a dated
/// version: the index listings, what SDKs need to find their region and instance type, and
/// what in-cluster controllers read (the AWS Load Balancer Controller finds its VPC through
/// `mac` and `network/interfaces/macs/<mac>/vpc-id`). Nothing that identifies or empowers
/// the node: that is refused before this list is consulted.
pub const DEFAULT_ALLOW_ROUTE_REGEXP: &str = concat!(
    r"^/(latest|[0-9]{4}-[0-9]{2}-[0-9]{2})/(",
    r"|meta-data/",
    r"|meta-data/(ami-id|instance-id|instance-type|hostname|local-hostname|local-ipv4|mac)",
    r"|meta-data/placement/|meta-data/placement/[a-z0-9-]+",
    r"|meta-data/services/|meta-data/services/(domain|partition)",
    r"|meta-data/network/|meta-data/network/interfaces/|meta-data/network/interfaces/macs/",
    r"|meta-data/network/interfaces/macs/[0-9a-f:]{17}/",
    r"|meta-data/network/interfaces/macs/[0-9a-f:]{17}/(vpc-id|subnet-id|vpc-ipv4-cidr-block|vpc-ipv4-cidr-blocks)",
    r"|dynamic/|dynamic/instance-identity/|dynamic/instance-identity/document",
    r")$"
);

/// Paths iamlet never relays (rule 3), as examples under `/latest`: for the startup warning
/// about an allow-list that would match them.
pub const NEVER_RELAYED: &[&str] = &[
    "/latest/user-data",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/iam/info",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
    "/2016-09-02/api/token",
];

/// `--allow-route-regexp`, compiled to match whole paths only.
#[derive(Debug, Clone)]
pub struct AllowList(Regex);

impl AllowList {
    /// Compiles `pattern` anchored at both ends (kube2iam compiled it unanchored, so
    /// `/latest/*` matched anything containing `/latest`).
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(Self)
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.0.is_match(path)
    }

    /// The never-relayed paths this allow-list would match: they stay refused, and the
    /// operator is told at startup.
    pub fn overreach(&self) -> Vec<&'static str> {
        NEVER_RELAYED.iter().copied().filter(|path| self.is_match(path)).collect()
    }
}

impl Default for AllowList {
    fn default() -> Self {
        Self::new(DEFAULT_ALLOW_ROUTE_REGEXP).expect("the default allow-list compiles")
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/healthz`: iamlet's own liveness, on the metadata port too, where kube2iam's chart
    /// probes it. Nothing of the node's or a pod's.
    Health,
    /// `PUT /latest/api/token`: an IMDSv2 session token.
    Token,
    /// `<version>/meta-data/iam/security-credentials` with or without the trailing slash.
    RoleName,
    /// `<version>/meta-data/iam/security-credentials/<role>`.
    Credentials(&'a str),
    /// An allow-listed path, answered by the node's real IMDS.
    Proxy,
    /// The node's identity or power: never relayed.
    Sensitive,
    /// Anything else: not served.
    NotAllowed,
    /// Not a canonical path.
    Malformed,
}

impl Route<'_> {
    /// The metrics label of the route (bounded set: never the raw path).
    pub fn label(&self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Token => "token",
            Route::RoleName => "role-name",
            Route::Credentials(_) => "credentials",
            Route::Proxy => "proxy",
            Route::Sensitive => "sensitive",
            Route::NotAllowed => "not-allowed",
            Route::Malformed => "malformed",
        }
    }
}

const CREDENTIALS: &str = "meta-data/iam/security-credentials";

/// Routes `path` (without the query string).
pub fn classify<'a>(path: &'a str, allow: &AllowList) -> Route<'a> {
    if !is_canonical(path) {
        return Route::Malformed;
    }
    if path == "/latest/api/token" {
        return Route::Token;
    }
    if path == "/healthz" {
        return Route::Health;
    }
    // Whatever the first segment is (a version, in IMDS), rules 2 and 3 apply to the rest, in
    // any letter case, so no case variant slips through.
    if let Some((_, rest)) = path[1..].split_once('/') {
        if let Some(after) = strip_prefix_ignore_case(rest, CREDENTIALS) {
            return match after {
                "" | "/" => Route::RoleName,
                _ => match after[1..].strip_suffix('/').unwrap_or(&after[1..]) {
                    name if after.starts_with('/') && !name.contains('/') => Route::Credentials(name),
                    _ => Route::NotAllowed,
                },
            };
        }
        if is_sensitive(rest.strip_suffix('/').unwrap_or(rest)) {
            return Route::Sensitive;
        }
    }
    if allow.is_match(path) { Route::Proxy } else { Route::NotAllowed }
}

/// Rule 3, on the path after its version segment, without a trailing slash, in any case.
fn is_sensitive(rest: &str) -> bool {
    const EXACT: &[&str] = &["meta-data/iam/info", "api/token"];
    const TREES: &[&str] = &[
        "user-data",
        "meta-data/identity-credentials",
        "dynamic/instance-identity/pkcs7",
        "dynamic/instance-identity/signature",
        "dynamic/instance-identity/rsa2048",
    ];
    EXACT.iter().any(|exact| rest.eq_ignore_ascii_case(exact))
        || TREES
            .iter()
            .any(|tree| strip_prefix_ignore_case(rest, tree).is_some_and(|r| r.is_empty() || r.starts_with('/')))
}

/// `text` without `prefix`, compared in any ASCII letter case.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Absolute, no empty or dot segments (a trailing slash is fine), printable ASCII, no escapes.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let body = rest.strip_suffix('/').unwrap_or(rest);
    path.len() <= 1024
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && (rest.is_empty() || body.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route<'_> {
        classify(path, &AllowList::default())
    }

    #[test]
    fn credential_paths_are_served_under_every_version() {
        for version in ["latest", "2016-09-02", "2021-07-15", "1.0", "LATEST"] {
            let base = format!("/{version}/meta-data/iam/security-credentials");
            assert_eq!(route(&base), Route::RoleName, "{base}");
            assert_eq!(route(&format!("{base}/")), Route::RoleName);
            assert_eq!(route(&format!("{base}/app")), Route::Credentials("app"));
            assert_eq!(route(&format!("{base}/App/")), Route::Credentials("App"), "the name keeps its case");
            assert_eq!(route(&format!("{base}/a/b")), Route::NotAllowed);
        }
        assert_eq!(route("/latest/meta-data/iam/Security-Credentials/node-role"), Route::Credentials("node-role"));
        assert_eq!(route("/latest/meta-data/iam/security-credentialsX"), Route::NotAllowed);
        assert_eq!(route("/latest/api/token"), Route::Token);
    }

    #[test]
    fn sensitive_paths_are_refused_under_every_version_and_allow_list() {
        let everything = AllowList::new(".*").unwrap();
        for version in ["latest", "2016-09-02", "1.0", "Latest"] {
            for rest in [
                "user-data",
                "user-data/",
                "User-Data",
                "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                "meta-data/identity-credentials/",
                "meta-data/iam/info",
                "meta-data/IAM/info/",
                "dynamic/instance-identity/pkcs7",
                "dynamic/instance-identity/signature",
                "dynamic/instance-identity/rsa2048",
                "api/token",
            ] {
                let path = format!("/{version}/{rest}");
                if path == "/latest/api/token" {
                    continue; // iamlet's own token route
                }
                assert_eq!(classify(&path, &everything), Route::Sensitive, "{path}");
            }
        }
        assert_eq!(classify("/2016-09-02/api/token", &everything), Route::Sensitive, "only iamlet issues tokens");
        assert_eq!(classify("/latest/user-dataX", &everything), Route::Proxy, "a prefix is not the tree");
    }

    #[test]
    fn default_allow_list_keeps_what_sdks_and_controllers_read() {
        for allowed in [
            "/latest/meta-data/",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/placement/availability-zone-id",
            "/2016-09-02/meta-data/placement/region",
            "/latest/meta-data/instance-type",
            "/latest/meta-data/mac",
            "/latest/meta-data/network/interfaces/macs/",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-id",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-id",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-ipv4-cidr-blocks",
            "/latest/dynamic/instance-identity/document",
            "/2021-03-23/dynamic/instance-identity/document",
        ] {
            assert_eq!(route(allowed), Route::Proxy, "{allowed}");
        }
        for refused in [
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/security-credentials",
            "/latest/meta-data/placement/regionX/y",
            "/latest/meta-data/tags/instance/Name",
            "/",
        ] {
            assert_eq!(route(refused), Route::NotAllowed, "{refused}");
        }
    }

    #[test]
    fn the_operators_regexp_is_anchored_and_only_adds() {
        // kube2iam-style `/latest/*` matched anything containing "/latest" unanchored.
        let latest = AllowList::new("/latest/*").unwrap();
        assert_eq!(classify("/latest/meta-data/instance-type", &latest), Route::NotAllowed);
        assert_eq!(classify("/latest/", &latest), Route::Proxy);
        let broad = AllowList::new("/latest/.*").unwrap();
        assert_eq!(classify("/latest/meta-data/tags/instance/Name", &broad), Route::Proxy);
        assert_eq!(classify("/latest/user-data", &broad), Route::Sensitive);
        assert_eq!(broad.overreach().len(), NEVER_RELAYED.len() - 1, "all but the dated token path");
        assert!(AllowList::default().overreach().is_empty(), "the default asks for nothing sensitive");
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
            "//",
            "/latest/meta data",
            "/latest\\meta-data",
            "",
        ] {
            assert_eq!(route(bad), Route::Malformed, "{bad:?}");
        }
        assert_eq!(route(&format!("/{}", "a".repeat(2000))), Route::Malformed);
    }
}
