//! Sessions: how long they last, when they are refreshed, and their names, which name the
//! pod so CloudTrail shows which pod acted.

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

    /// The session name of `pod`'s credentials.
    pub fn name(&self, pod: &PodIdentity) -> String {
        session_name(&pod.namespace, &pod.name)
    }
}

/// STS's limit on `RoleSessionName`.
const MAX_LEN: usize = 64;

/// `<namespace>.<pod>`, cut to STS's character set (`[\w+=,.@-]`) and 64 characters.
///
/// Names longer than 64 characters keep their start and end a short hash of the whole, so
/// two long pod names that share a prefix still get different sessions (and cache keys).
pub fn session_name(namespace: &str, pod: &str) -> String {
    let full: String = format!("{namespace}.{pod}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) { c } else { '-' })
        .collect();
    if full.len() <= MAX_LEN {
        return full;
    }
    let hash = fnv1a(full.as_bytes());
    format!("{}-{hash:08x}", &full[..MAX_LEN - 9])
}

/// A small, stable hash: the suffix must be the same on every node and every release.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
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
    fn long_names_are_cut_to_64_and_stay_distinct() {
        let ns = "n".repeat(40);
        let a = session_name(&ns, &format!("{}-a", "p".repeat(40)));
        let b = session_name(&ns, &format!("{}-b", "p".repeat(40)));
        assert_eq!(a.len(), 64);
        assert_eq!(b.len(), 64);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)));
    }
}
