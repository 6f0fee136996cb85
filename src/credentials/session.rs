//! Role session names: they name the pod, so CloudTrail shows which pod acted.

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
