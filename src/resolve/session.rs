//! Sessions: how long they last, when they are refreshed, which pods share one
//! (`--session-scope`), and their names, which name what the scope names (the pod, the
//! ServiceAccount, the node) so CloudTrail shows who acted.

use std::time::Duration;

use crate::pod::PodIdentity;

/// The longest session STS grants when the caller's credentials are themselves a role's (an
/// instance profile, IRSA, an intermediate role): role chaining caps `DurationSeconds` at 1 h,
/// and asking for more fails every call.
pub const MAX_CHAINED_SESSION: Duration = Duration::from_secs(3600);

/// Session lengths and refresh points, from `--iam-role-session-ttl`.
///
/// Sessions are asked for twice the TTL and refreshed once less than the TTL remains, so what
/// a pod receives always has more than the TTL left while STS is healthy. A TTL above half the
/// role-chaining cap is lowered to it (with a warning at startup, see [`Self::lowered_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRules {
    iam_role_session_ttl: Duration,
    refresh_before: Duration,
}

impl SessionRules {
    pub fn new(iam_role_session_ttl: Duration) -> Self {
        Self { iam_role_session_ttl, refresh_before: iam_role_session_ttl.min(MAX_CHAINED_SESSION / 2) }
    }

    /// Refresh credentials once less than this remains.
    pub fn refresh_before(&self) -> Duration {
        self.refresh_before
    }

    /// The `DurationSeconds` asked of STS: twice the refresh point, never above the cap.
    pub fn duration(&self) -> Duration {
        (self.refresh_before * 2).min(MAX_CHAINED_SESSION)
    }

    /// The `--iam-role-session-ttl` asked for, when it had to be lowered to fit the cap.
    pub fn lowered_from(&self) -> Option<Duration> {
        (self.iam_role_session_ttl != self.refresh_before).then_some(self.iam_role_session_ttl)
    }
}

/// Which pods share one session (`--session-scope`): the trade between what CloudTrail tells
/// apart and how many AssumeRole calls a fleet makes. STS limits AssumeRole per account and
/// region (about 600/s); a node whose 110 pods share a role makes 110 sessions of it in `pod`
/// scope and one in `role` scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SessionScope {
    /// One session per pod, named `<namespace>.<pod>` (the default).
    #[default]
    Pod,
    /// One per role, namespace and ServiceAccount on the node, named
    /// `<namespace>@<serviceaccount>`.
    ServiceAccount,
    /// One per role on the node, named `iamlet@<node>`, as kube2iam shares them.
    Role,
}

impl SessionScope {
    /// The flag's value: `pod`, `service-account` or `role`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionScope::Pod => "pod",
            SessionScope::ServiceAccount => "service-account",
            SessionScope::Role => "role",
        }
    }

    /// Whether one session may serve more than one pod: the session then names no pod and
    /// carries no pod's tags.
    pub fn is_shared(self) -> bool {
        self != SessionScope::Pod
    }

    /// The scope `text` names (its [`Self::as_str`]), if any.
    pub fn parse(text: &str) -> Option<Self> {
        [SessionScope::Pod, SessionScope::ServiceAccount, SessionScope::Role].into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for SessionScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The session name of `pod`'s credentials in `pod` scope (see [`session_name`]).
pub fn session_of(pod: &PodIdentity) -> String {
    session_name(&pod.namespace, &pod.name)
}

/// The session name of `pod`'s credentials in `scope`, on the node `node`: what the scope
/// names, in STS's characters and 64 characters at most (see [`session_name`]).
pub fn scoped_session_name(scope: SessionScope, pod: &PodIdentity, node: &str) -> String {
    match scope {
        SessionScope::Pod => session_of(pod),
        SessionScope::ServiceAccount => joined(&pod.namespace, '@', &pod.service_account),
        SessionScope::Role => joined("iamlet", '@', node),
    }
}

/// STS's limit on `RoleSessionName`.
const MAX_LEN: usize = 64;
/// Hex digits of the hash a shortened name ends with.
const HASH_LEN: usize = 8;
/// The namespace's start a shortened name keeps at least (or the whole namespace).
const MIN_NAMESPACE: usize = 20;

/// `<namespace>.<pod>` in STS's character set (`[\w+=,.@-]`; anything else becomes `-`), so
/// CloudTrail's `assumed-role/<role>/<session>` names the pod that acted.
///
/// When that exceeds STS's 64 characters (Deployments with long names make 80-character
/// pods), both parts stay recognisable: `<namespace start>.<pod end>_<hash>`, where
///
/// - the pod's **end** is kept (at least 34 characters): it holds the ReplicaSet and pod
///   hashes that tell replicas apart, where the start is what they share;
/// - the namespace's **start** is kept (at least 20 characters, or all of it);
/// - `<hash>` is 8 hex digits of the SHA-256 of `<namespace>/<pod>` as Kubernetes has them,
///   so two pods whose kept parts coincide still get different sessions (and cache keys).
///   `_` appears in no Kubernetes name, so a shortened name never equals a whole one.
///
/// The same on every node and every release: the hash is over the names alone.
pub fn session_name(namespace: &str, pod: &str) -> String {
    joined(namespace, '.', pod)
}

/// The `SourceIdentity` of a pod's sessions with `--source-identity`:
/// `<namespace>@<serviceaccount>`, in STS's characters (`[\w+=,.@-]`, 2 to 64 of them; `/` is
/// refused), shortened as [`session_name`] shortens (the namespace's start, the
/// ServiceAccount's end, a hash of both), so a 63-character namespace with a 253-character
/// ServiceAccount still gives a valid, recognisable value. Unlike the session name, it
/// survives role chaining: whatever the pod's role assumes next still names it.
pub fn source_identity(namespace: &str, service_account: &str) -> String {
    joined(namespace, '@', service_account)
}

/// `<first><separator><second>` within STS's 64 characters, shortened recognisably.
fn joined(first: &str, separator: char, second: &str) -> String {
    let namespace = sts_characters(first);
    let name = sts_characters(second);
    if namespace.len() + 1 + name.len() <= MAX_LEN {
        return format!("{namespace}{separator}{name}");
    }
    let room = MAX_LEN - 1 - 1 - HASH_LEN;
    let namespace_kept = namespace.len().min(MIN_NAMESPACE.max(room.saturating_sub(name.len())));
    let name_kept = (room - namespace_kept).min(name.len());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{first}/{second}").as_bytes());
    let hash: String = digest.as_ref()[..HASH_LEN / 2].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{separator}{}_{hash}", &namespace[..namespace_kept], &name[name.len() - name_kept..])
}

/// `text` with every character outside STS's session-name set replaced by `-`: ASCII only,
/// so byte offsets are character offsets.
fn sts_characters(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) { c } else { '-' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_never_exceed_the_role_chaining_cap() {
        for minutes in [15, 20, 30, 45, 60, 360] {
            let rules = SessionRules::new(Duration::from_secs(minutes * 60));
            assert!(rules.duration() <= MAX_CHAINED_SESSION, "{minutes}m");
            assert!(
                rules.refresh_before() >= Duration::from_secs(15 * 60),
                "handed out outside the SDKs' refresh window"
            );
            assert!(rules.refresh_before() < rules.duration(), "{minutes}m: a refresh point inside the session");
            assert_eq!(rules.lowered_from().is_some(), minutes > 30, "{minutes}m");
        }
        assert_eq!(SessionRules::new(Duration::from_secs(1800)).duration(), Duration::from_secs(3600));
        assert_eq!(SessionRules::new(Duration::from_secs(900)).duration(), Duration::from_secs(1800));
        assert_eq!(SessionRules::new(Duration::from_secs(7200)).duration(), MAX_CHAINED_SESSION);
    }

    #[test]
    fn names_the_pod() {
        assert_eq!(session_name("shop", "web-7d9f-x2k"), "shop.web-7d9f-x2k");
    }

    #[test]
    fn replaces_characters_sts_refuses() {
        assert_eq!(session_name("a b", "c/d:e"), "a-b.c-d-e");
    }

    #[test]
    fn long_names_keep_the_namespaces_start_and_the_pods_end() {
        // A 50-character namespace and an 86-character Deployment pod: the replica's hashes
        // and the namespace stay readable in CloudTrail.
        let namespace = "payments-reconciliation-batch-processing-eu-west-1";
        let pod = "payments-reconciliation-batch-processing-worker-deployment-longer-name-7d9f8b6c5-x2k4q";
        assert_eq!((namespace.len(), pod.len()), (50, 86));
        let name = session_name(namespace, pod);
        assert_eq!(name.len(), 64);
        assert!(name.starts_with("payments-reconciliat."), "{name}");
        let (kept, hash) = name.rsplit_once('_').unwrap();
        assert_eq!(kept, "payments-reconciliat.oyment-longer-name-7d9f8b6c5-x2k4q", "34 characters of the pod's end");
        assert_eq!(hash.len(), 8);
        assert_ne!(name, session_name(namespace, &pod.replace("x2k4q", "m8n3p")));
        // A long namespace with a short pod keeps more of the namespace.
        let name = session_name(&"n".repeat(63), "web-1");
        assert!(name.starts_with(&format!("{}.web-1_", "n".repeat(49))), "{name}");
    }

    #[test]
    fn a_source_identity_names_the_namespace_and_service_account_in_stss_characters() {
        assert_eq!(source_identity("shop", "web"), "shop@web");
        let long = source_identity(&"n".repeat(63), &format!("{}-reader", "s".repeat(246)));
        assert!((2..=64).contains(&long.len()), "{long}");
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)), "{long}");
        assert!(long.starts_with(&"n".repeat(20)) && long.contains("-reader_"), "recognisable: {long}");
        assert_ne!(long, source_identity(&"n".repeat(63), &format!("{}-writer", "s".repeat(246))));
        assert!(!source_identity("a/b", "c").contains('/'), "STS refuses a slash");
    }

    #[test]
    fn each_scope_names_what_it_shares() {
        let pod = PodIdentity {
            namespace: "shop".into(),
            name: "web-7d9f-x2k".into(),
            service_account: "web".into(),
            ..PodIdentity::default()
        };
        let node = "ip-10-0-1-23.eu-west-1.compute.internal";
        assert_eq!(scoped_session_name(SessionScope::Pod, &pod, node), "shop.web-7d9f-x2k");
        assert_eq!(scoped_session_name(SessionScope::ServiceAccount, &pod, node), "shop@web");
        assert_eq!(scoped_session_name(SessionScope::Role, &pod, node), format!("iamlet@{node}"));
        let long = scoped_session_name(SessionScope::Role, &pod, &format!("{}-node", "n".repeat(240)));
        assert!(long.len() <= 64 && long.starts_with("iamlet@") && long.contains("-node_"), "{long}");
        for scope in [SessionScope::Pod, SessionScope::ServiceAccount, SessionScope::Role] {
            assert_eq!(SessionScope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(SessionScope::parse("namespace"), None);
    }

    #[test]
    fn names_that_fit_are_kept_whole() {
        let ns = "n".repeat(30);
        let pod = "p".repeat(33);
        assert_eq!(session_name(&ns, &pod), format!("{ns}.{pod}"));
    }
}
