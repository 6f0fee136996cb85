//! Which handler a metadata path goes to, and what may ever be relayed. Pure, so the relay
//! policy is tested without I/O.
//!
//! A path is first [normalised](normalize) as clients in the wild send it: repeated slashes
//! collapse to one (`meta-data//iam/` is `meta-data/iam/`, as IMDS reads it). Then three
//! rules, in this order, whatever `--allow-route-regexp` says:
//!
//! 1. Paths are canonical or refused: a path with a dot segment (`.`, `..`), a backslash, a
//!    percent-escape, a `;` or any character metadata paths are not made of could be
//!    normalised by the real IMDS into one the rules below refused.
//! 2. The credential routes are iamlet's, under **every** version prefix (`/latest`,
//!    `/2016-09-02`, `/1.0`...): IMDS answers `iam/security-credentials/` under each of them,
//!    so relaying any one would hand out the node's role. Found anywhere else in a path (no
//!    version, a doubled one), they are refused.
//! 3. What identifies or empowers the node is never relayed, wherever it starts in the path
//!    (under any prefix, none, or several), in any letter case, a segment's trailing dots
//!    ignored: `meta-data/identity-credentials/`, `user-data`, the signed identity
//!    documents (`dynamic/instance-identity/{pkcs7,signature,rsa2048}`, enough to log in to
//!    Vault's AWS auth as the node), the node's instance profile (`meta-data/iam/info`), and
//!    the real IMDS's `api/token`.
//!
//! Only then is the allow-list consulted: the default harmless paths, plus what the
//! operator's `--allow-route-regexp` admits (matched against the whole path, anchored), each
//! with or without a trailing slash, as IMDS answers both. So an operator's regexp can only
//! add harmless paths; `--allow-route-regexp-only` drops the default list for those who want
//! less.

use std::borrow::Cow;

use regex::Regex;

/// Paths pods may read from the node's real metadata service, under `/latest` or a dated
/// version: the index listings, what SDKs need to find their region and instance type, what
/// in-cluster controllers read (the AWS Load Balancer Controller finds its VPC through `mac`
/// and `network/interfaces/macs/<mac>/vpc-id`), and the Spot interruption and rebalance
/// notices and scheduled maintenance that workloads poll to drain in time. Nothing that
/// identifies or empowers the node: that is refused before this list is consulted. A
/// trailing slash is matched apart (see [`AllowList::is_match`]).
pub const DEFAULT_ALLOW_ROUTE_REGEXP: &str = concat!(
    r"^/(latest|[0-9]{4}-[0-9]{2}-[0-9]{2})/(",
    r"|meta-data/",
    r"|meta-data/(ami-id|instance-id|instance-type|hostname|local-hostname|local-ipv4|mac)",
    r"|meta-data/placement/|meta-data/placement/[a-z0-9-]+",
    r"|meta-data/services/|meta-data/services/(domain|partition)",
    r"|meta-data/network/|meta-data/network/interfaces/|meta-data/network/interfaces/macs/",
    r"|meta-data/network/interfaces/macs/[0-9a-f:]{17}/",
    r"|meta-data/network/interfaces/macs/[0-9a-f:]{17}/(vpc-id|subnet-id|vpc-ipv4-cidr-block|vpc-ipv4-cidr-blocks)",
    r"|meta-data/spot/|meta-data/spot/(instance-action|termination-time)",
    r"|meta-data/events/|meta-data/events/recommendations/|meta-data/events/recommendations/rebalance",
    r"|meta-data/events/maintenance/|meta-data/events/maintenance/scheduled",
    r"|dynamic/|dynamic/instance-identity/|dynamic/instance-identity/document",
    r")$"
);

/// Well-known metadata paths outside the default list, under `/latest`: the startup line
/// names those an operator's `--allow-route-regexp` adds, so a regexp broader than meant
/// shows at once.
const WELL_KNOWN_EXTRAS: &[&str] = &[
    "/latest/meta-data/ami-launch-index",
    "/latest/meta-data/ami-manifest-path",
    "/latest/meta-data/autoscaling/target-lifecycle-state",
    "/latest/meta-data/block-device-mapping/",
    "/latest/meta-data/events/maintenance/history",
    "/latest/meta-data/instance-action",
    "/latest/meta-data/instance-life-cycle",
    "/latest/meta-data/ipv6",
    "/latest/meta-data/kernel-id",
    "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/security-group-ids",
    "/latest/meta-data/product-codes",
    "/latest/meta-data/public-hostname",
    "/latest/meta-data/public-ipv4",
    "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/meta-data/reservation-id",
    "/latest/meta-data/security-groups",
    "/latest/meta-data/tags/instance/",
];

/// Paths iamlet never relays (rule 3), as examples under `/latest` and without a version: for
/// the startup warning about an allow-list that would match them.
pub const NEVER_RELAYED: &[&str] = &[
    "/user-data",
    "/meta-data/iam/security-credentials/",
    "/latest/user-data",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/meta-data/iam/info",
    "/latest/dynamic/instance-identity/pkcs7",
    "/latest/dynamic/instance-identity/signature",
    "/latest/dynamic/instance-identity/rsa2048",
    "/2016-09-02/api/token",
];

/// What is relayed to the node's metadata service: the default harmless paths
/// ([`DEFAULT_ALLOW_ROUTE_REGEXP`]) and the operator's `--allow-route-regexp`, a union.
#[derive(Debug, Clone)]
pub struct AllowList {
    /// The default list; `None` with `--allow-route-regexp-only`.
    default: Option<Regex>,
    /// The operator's regexp, anchored; `None` when it is empty (it adds nothing).
    operator: Option<Regex>,
}

impl AllowList {
    /// The default list plus what `operator` admits, compiled anchored at both ends (kube2iam
    /// compiled it unanchored, so `/latest/*` matched anything containing `/latest`; here it
    /// still relays `/latest/` and everything the default relays). `only` drops the default
    /// list (`--allow-route-regexp-only`). An empty `operator` adds nothing.
    ///
    /// Errors: the regexp does not compile.
    pub fn new(operator: &str, only: bool) -> Result<Self, regex::Error> {
        let operator = match operator {
            "" => None,
            pattern => Some(Regex::new(&format!("^(?:{pattern})$"))?),
        };
        let default = (!only).then(|| Regex::new(DEFAULT_ALLOW_ROUTE_REGEXP).expect("the default allow-list compiles"));
        Ok(Self { default, operator })
    }

    /// Whether `path` (normalised, see [`normalize`]) may be relayed, before the never-relayed
    /// rules: one of the lists admits it with or without its trailing slash, since IMDS answers
    /// a leaf as `instance-type` and as `instance-type/`, and a listing as `placement/` and
    /// as `placement`.
    pub fn is_match(&self, path: &str) -> bool {
        let lists = || [&self.default, &self.operator].into_iter().flatten();
        if lists().any(|list| list.is_match(path)) {
            return true;
        }
        // Only a path not admitted as sent pays for its other form.
        let toggled = match path.strip_suffix('/') {
            Some("") => return false,
            Some(bare) => Cow::Borrowed(bare),
            None => Cow::Owned(format!("{path}/")),
        };
        lists().any(|list| list.is_match(&toggled))
    }

    /// The never-relayed paths the operator's regexp would match: they stay refused, and the
    /// operator is told at startup.
    pub fn overreach(&self) -> Vec<&'static str> {
        NEVER_RELAYED.iter().copied().filter(|path| self.is_match(path)).collect()
    }

    /// The well-known paths the operator's regexp adds to the default list, for the startup
    /// line (a sample: a regexp may admit paths no list names).
    pub fn additions(&self) -> Vec<&'static str> {
        let default = Self::default();
        WELL_KNOWN_EXTRAS.iter().copied().filter(|path| self.is_match(path) && !default.is_match(path)).collect()
    }

    /// Whether the default list is part of this one (not `--allow-route-regexp-only`).
    pub fn keeps_default(&self) -> bool {
        self.default.is_some()
    }

    /// The operator's regexp, as given (without the anchors): `None` when it adds nothing.
    pub fn operator(&self) -> Option<&str> {
        self.operator.as_ref().map(|re| {
            let text = re.as_str();
            &text["^(?:".len()..text.len() - ")$".len()]
        })
    }
}

impl Default for AllowList {
    /// The default harmless paths alone.
    fn default() -> Self {
        Self::new("", false).expect("an empty regexp compiles")
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

/// `path` as IMDS reads it: runs of slashes collapsed to one (clients that join URL parts
/// with a slash send `meta-data//iam/`). `None` when it is not canonical even then (rule 1):
/// a dot segment, a percent-escape, a backslash, a non-printable byte, no leading slash, or
/// longer than 1 KiB. Borrowed when nothing changed.
pub fn normalize(path: &str) -> Option<Cow<'_, str>> {
    if path.len() > MAX_PATH {
        return None;
    }
    let path = match path.contains("//") {
        false => Cow::Borrowed(path),
        true => {
            let mut collapsed = String::with_capacity(path.len());
            for c in path.chars() {
                if !(c == '/' && collapsed.ends_with('/')) {
                    collapsed.push(c);
                }
            }
            Cow::Owned(collapsed)
        }
    };
    is_canonical(&path).then_some(path)
}

/// Routes `path` (without the query string), which must be normalised ([`normalize`]): a
/// path that is not is [`Route::Malformed`].
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
    // Rules 2 and 3 wherever a segment starts, in any letter case: after the first segment
    // (a version, in IMDS) the credential routes are iamlet's; anywhere else (no version, a
    // doubled one, a made-up prefix) they, and the node's secrets, are refused, so no prefix
    // an allow-list admits can carry them to the node's metadata service.
    let starts = std::iter::once(1).chain(path.match_indices('/').map(|(i, _)| i + 1).skip(1));
    for (position, start) in starts.enumerate() {
        let rest = &path[start..];
        if let Some(after) = strip_prefix_ignore_case(rest, CREDENTIALS) {
            if position == 1 {
                return match after {
                    "" | "/" => Route::RoleName,
                    _ => match after[1..].strip_suffix('/').unwrap_or(&after[1..]) {
                        name if after.starts_with('/') && !name.contains('/') => Route::Credentials(name),
                        _ => Route::NotAllowed,
                    },
                };
            }
            if after.is_empty() || after.starts_with('/') {
                return Route::Sensitive;
            }
        }
        if is_sensitive(rest) {
            return Route::Sensitive;
        }
    }
    if allow.is_match(path) { Route::Proxy } else { Route::NotAllowed }
}

/// Rule 3, on a path from one of its segments on, in any letter case, with or without a
/// trailing slash, and a segment's trailing dots ignored (`user-data.` is `user-data` to
/// servers that trim them).
fn is_sensitive(rest: &str) -> bool {
    const EXACT: &[&[&str]] = &[&["meta-data", "iam", "info"], &["api", "token"]];
    const TREES: &[&[&str]] = &[
        &["user-data"],
        &["meta-data", "identity-credentials"],
        &["dynamic", "instance-identity", "pkcs7"],
        &["dynamic", "instance-identity", "signature"],
        &["dynamic", "instance-identity", "rsa2048"],
    ];
    // Compared segment by segment as they are split, allocating nothing: this runs for every
    // segment start of every request's path.
    let body = rest.strip_suffix('/').unwrap_or(rest);
    let matches = |tree: &[&str], whole: bool| {
        let mut segments = body.split('/').map(|segment| segment.trim_end_matches('.'));
        tree.iter().all(|want| segments.next().is_some_and(|got| got.eq_ignore_ascii_case(want)))
            && (!whole || segments.next().is_none())
    };
    EXACT.iter().any(|exact| matches(exact, true)) || TREES.iter().any(|tree| matches(tree, false))
}

/// `text` without `prefix`, compared in any ASCII letter case.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// The longest path served, in bytes: IMDS paths are short, and a long one is an attack.
const MAX_PATH: usize = 1024;

/// Absolute, no empty or dot segments (a trailing slash is fine), and only the characters
/// metadata paths are made of (letters, digits, `-._:+=@`: tag keys included): no escape, no
/// backslash, no `;` parameter or other character a server might read differently.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let body = rest.strip_suffix('/').unwrap_or(rest);
    path.len() <= MAX_PATH
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._:+=@".contains(&b))
        && (rest.is_empty() || body.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How the service routes a request's path: normalised, then classified.
    fn routed(path: &str, allow: &AllowList) -> Route<'static> {
        match normalize(path) {
            // Leaked: a test's paths are few, and the route borrows its path.
            Some(path) => classify(Box::leak(path.into_owned().into_boxed_str()), allow),
            None => Route::Malformed,
        }
    }

    fn route(path: &str) -> Route<'static> {
        routed(path, &AllowList::default())
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
        let everything = AllowList::new(".*", false).unwrap();
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

    /// Found by attacking as a pod with `--allow-route-regexp=.*`: the rules used to apply
    /// only after the first segment, so a path without a version (or with two) reached the
    /// node's metadata service.
    #[test]
    fn no_prefix_a_doubled_one_or_a_near_miss_carries_a_secret_past_a_broad_allow_list() {
        let everything = AllowList::new(".*", false).unwrap();
        for path in [
            "/meta-data/iam/security-credentials/node-role",
            "/meta-data/iam/security-credentials/",
            "/meta-data/iam/security-credentials",
            "/user-data",
            "/USER-DATA/",
            "/meta-data/iam/info",
            "/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/dynamic/instance-identity/pkcs7",
            "/api/token",
            "/latest/latest/user-data",
            "/latest/latest/meta-data/iam/security-credentials/node-role",
            "/x/y/z/dynamic/instance-identity/signature",
            "/latest/user-data.",
            "/latest/meta-data/iam/info./",
            "/latest/meta-data./identity-credentials/",
        ] {
            assert_eq!(routed(path, &everything), Route::Sensitive, "{path}");
        }
        for path in
            ["/latest/user-data;x", "/latest/meta-data;/iam;/info", "/2016-09-02/api/token~", "/latest/user-data&"]
        {
            assert_eq!(routed(path, &everything), Route::Malformed, "{path}");
        }
        // What merely contains such a name is not refused: the credential route of the pod's
        // own role, a tag, a longer name.
        assert_eq!(route("/latest/meta-data/iam/security-credentials/user-data"), Route::Credentials("user-data"));
        assert_eq!(routed("/latest/meta-data/tags/instance/user-data-owner", &everything), Route::Proxy);
        assert_eq!(routed("/latest/meta-data/tags/instance/Team+Name=a@b:c", &everything), Route::Proxy);
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
    fn default_allow_list_relays_spot_and_maintenance_notices() {
        for version in ["latest", "2021-07-15"] {
            for rest in [
                "meta-data/spot/instance-action",
                "meta-data/spot/termination-time",
                "meta-data/events/recommendations/rebalance",
                "meta-data/events/maintenance/scheduled",
                "meta-data/spot/",
                "meta-data/events/",
            ] {
                let path = format!("/{version}/{rest}");
                assert_eq!(route(&path), Route::Proxy, "{path}");
            }
        }
        assert_eq!(route("/latest/meta-data/events/maintenance/history"), Route::NotAllowed, "not asked for");
    }

    #[test]
    fn every_admitted_path_is_admitted_with_or_without_its_trailing_slash() {
        let tags = AllowList::new("/latest/meta-data/tags/instance/[A-Za-z]+", false).unwrap();
        for version in ["latest", "2016-09-02", "2021-03-23"] {
            for leaf in ["meta-data/instance-type", "meta-data/placement/region", "meta-data/spot/instance-action"] {
                for path in [format!("/{version}/{leaf}"), format!("/{version}/{leaf}/")] {
                    assert_eq!(route(&path), Route::Proxy, "{path}");
                }
            }
            for listing in ["meta-data/placement/", "meta-data/placement", "meta-data/", "meta-data"] {
                let path = format!("/{version}/{listing}");
                assert_eq!(route(&path), Route::Proxy, "{path}");
            }
        }
        assert_eq!(routed("/latest/meta-data/tags/instance/Name/", &tags), Route::Proxy, "the operator's leaves too");
        assert_eq!(routed("/latest/meta-data/tags/instance/Name", &tags), Route::Proxy);
        assert_eq!(route("/latest/meta-data/tags/instance/Name/"), Route::NotAllowed);
    }

    #[test]
    fn repeated_slashes_are_collapsed_before_every_rule() {
        assert_eq!(
            normalize("/latest/meta-data//iam/security-credentials/").unwrap(),
            "/latest/meta-data/iam/security-credentials/"
        );
        assert!(
            matches!(normalize("/latest/meta-data/"), Some(Cow::Borrowed(_))),
            "nothing to collapse, nothing allocated"
        );
        assert_eq!(route("/latest/meta-data//iam/security-credentials/"), Route::RoleName);
        assert_eq!(route("//latest///meta-data/iam//security-credentials//app"), Route::Credentials("app"));
        assert_eq!(route("/latest//meta-data/placement//region"), Route::Proxy);
        assert_eq!(route("/latest/meta-data//instance-type//"), Route::Proxy);
        // The never-relayed rules see the collapsed path, whatever the allow-list.
        let everything = AllowList::new(".*", false).unwrap();
        for sneaky in
            ["/latest//user-data", "/latest/meta-data//iam//info", "//latest/dynamic//instance-identity/pkcs7"]
        {
            assert_eq!(routed(sneaky, &everything), Route::Sensitive, "{sneaky}");
        }
        assert_eq!(route("//"), Route::NotAllowed, "the root is not served, collapsed or not");
        assert_eq!(route(&"/".repeat(2000)), Route::Malformed, "too long before collapsing");
    }

    #[test]
    fn the_operators_regexp_is_anchored_and_adds_to_the_default() {
        // kube2iam-style `/latest/*` matched anything containing "/latest" unanchored; anchored,
        // it admits `/latest/` (and `/latest`), and the default list still stands beside it.
        let latest = AllowList::new("/latest/*", false).unwrap();
        assert_eq!(classify("/latest/meta-data/placement/region", &latest), Route::Proxy, "what SDKs need");
        assert_eq!(classify("/latest/", &latest), Route::Proxy);
        assert_eq!(classify("/latest/meta-data/tags/instance/Name", &latest), Route::NotAllowed);
        assert!(latest.additions().is_empty(), "it adds nothing well known");
        let broad = AllowList::new("/latest/.*", false).unwrap();
        assert_eq!(classify("/latest/meta-data/tags/instance/Name", &broad), Route::Proxy);
        assert_eq!(classify("/latest/user-data", &broad), Route::Sensitive);
        assert_eq!(classify("/latest/meta-data/iam/security-credentials/", &broad), Route::RoleName);
        assert_eq!(broad.overreach().len(), NEVER_RELAYED.len() - 3, "all but the dated and unversioned paths");
        assert_eq!(AllowList::new(".*", false).unwrap().overreach().len(), NEVER_RELAYED.len());
        assert!(broad.additions().contains(&"/latest/meta-data/tags/instance/"), "{:?}", broad.additions());
        assert_eq!(broad.operator(), Some("/latest/.*"));
        assert!(AllowList::default().overreach().is_empty(), "the default asks for nothing sensitive");
        assert!(AllowList::default().additions().is_empty());
        // Empty: the default alone.
        let empty = AllowList::new("", false).unwrap();
        assert_eq!((empty.operator(), empty.keeps_default()), (None, true));
        assert_eq!(classify("/latest/meta-data/placement/region", &empty), Route::Proxy);
    }

    #[test]
    fn only_the_operators_regexp_when_asked_explicitly() {
        let only = AllowList::new("/latest/meta-data/placement/region", true).unwrap();
        assert!(!only.keeps_default());
        assert_eq!(classify("/latest/meta-data/placement/region", &only), Route::Proxy);
        assert_eq!(classify("/latest/meta-data/placement/region/", &only), Route::Proxy);
        assert_eq!(classify("/latest/meta-data/instance-type", &only), Route::NotAllowed);
        let nothing = AllowList::new("", true).unwrap();
        assert_eq!(classify("/latest/meta-data/", &nothing), Route::NotAllowed, "nothing relayed at all");
        assert_eq!(classify("/latest/meta-data/iam/security-credentials/", &nothing), Route::RoleName);
    }

    #[test]
    fn non_canonical_paths_are_malformed() {
        for bad in [
            "/latest/meta-data/placement/../iam/security-credentials/",
            "/latest/meta-data/placement/./region",
            "/latest/meta-data/placement/%72egion",
            "/latest/meta-data/iam/security-credentials/%2e%2e",
            "latest/meta-data",
            "/latest/meta-data//./iam/security-credentials/",
            "/latest/meta data",
            "/latest\\meta-data",
            "",
        ] {
            assert_eq!(route(bad), Route::Malformed, "{bad:?}");
        }
        assert_eq!(route(&format!("/{}", "a".repeat(2000))), Route::Malformed);
    }
}
