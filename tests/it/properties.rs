//! Property tests of everything a pod controls that iamlet parses: request paths, IMDSv2
//! tokens, role annotations (ARNs and names), namespace annotations, the session names made
//! of pods' names, and the interface patterns operators give. Each property runs a few thousand generated cases: none may
//! panic, and none may turn into something it must never be (a relayed credential path, a
//! valid forged token, a role in another account).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use iamlet::imds::TokenIssuer;
use iamlet::imds::routes::{AllowList, Route, classify, normalize};
use iamlet::netfilter::InterfaceMatch;
use iamlet::policy::{AllowedRoles, BaseArn, RestrictionFormat, RoleArn};
use iamlet::resolve::session_name;
use proptest::prelude::*;

/// A fixed seed, so the suite gives the same verdict on every run; set `PROPTEST_RNG_SEED`
/// to explore other cases.
fn config() -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1a31e7);
    ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

/// Path segments made of what real paths contain, and of what attacks use.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("latest".to_string()),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}",
        Just("1.0".to_string()),
        Just("meta-data".to_string()),
        Just("iam".to_string()),
        Just("security-credentials".to_string()),
        Just("Security-Credentials".to_string()),
        Just("user-data".to_string()),
        Just("identity-credentials".to_string()),
        Just("dynamic".to_string()),
        Just("instance-identity".to_string()),
        Just("pkcs7".to_string()),
        Just("info".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        "[a-zA-Z0-9._:-]{1,12}",
        "\\PC{0,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (proptest::collection::vec(segment(), 0..8), any::<bool>(), any::<bool>()).prop_map(|(segments, slash, double)| {
        let mut path = format!("/{}", segments.join(if double { "//" } else { "/" }));
        if slash {
            path.push('/');
        }
        path
    })
}

/// A namespace as Kubernetes allows it: a DNS label, 1 to 63 characters.
fn namespace() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z]([a-z0-9-]{0,61}[a-z0-9])?", "[a-z][a-z0-9-]{40,61}[a-z0-9]"]
}

/// A pod name as Kubernetes allows it (a DNS subdomain, up to 253 characters), often shaped as
/// a Deployment's: `<name>-<replicaset hash>-<pod hash>`.
fn pod_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?",
        "[a-z][a-z0-9-]{20,120}-[a-z0-9]{9,10}-[a-z0-9]{5}",
        "[a-z0-9]([a-z0-9.-]{100,251}[a-z0-9])",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// No path, under any allow-list, relays a credential route or the node's identity.
    #[test]
    fn paths_never_relay_credentials_or_the_nodes_identity(path in path(), everything in any::<bool>()) {
        let allow = if everything { AllowList::new(".*", false).unwrap() } else { AllowList::default() };
        // As the service routes it: normalised (repeated slashes collapsed), then classified.
        let normalized = normalize(&path).map(|p| p.into_owned());
        let route = normalized.as_deref().map_or(Route::Malformed, |p| classify(p, &allow));
        let path = normalized.as_deref().unwrap_or(&path);
        if route == Route::Proxy {
            // What IMDS serves under a version (any first segment) is what must never go out.
            let lower = path.to_ascii_lowercase();
            let rest = lower.trim_start_matches('/').split_once('/').map(|(_, rest)| rest).unwrap_or_default();
            for never in [
                "meta-data/iam/security-credentials", "user-data", "meta-data/identity-credentials", "meta-data/iam/info",
                "dynamic/instance-identity/pkcs7", "dynamic/instance-identity/signature", "dynamic/instance-identity/rsa2048",
                "api/token",
            ] {
                prop_assert!(!rest.starts_with(never), "{} would be relayed", path);
            }
            // Canonical: no empty, `.` or `..` segment (a name like `_..` is no traversal), no escape.
            let body = path.trim_start_matches('/').trim_end_matches('/');
            prop_assert!(body.is_empty() || body.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."), "{}", path);
            prop_assert!(!path.contains('%'), "{}", path);
        }
        if let Route::Credentials(name) = route {
            prop_assert!(!name.contains('/') && !name.is_empty() && path.contains(name));
        }
    }

    /// Arbitrary bytes are never a valid token, and never panic the check.
    #[test]
    fn forged_tokens_are_refused(token in "\\PC{0,80}", a in any::<[u8; 4]>()) {
        let issuer = TokenIssuer::with_key(b"property-test-key");
        let ip = IpAddr::from(a);
        prop_assert!(issuer.verify(&token, ip, SystemTime::now()).is_err());
    }

    /// A real token is bound to its IP and lifetime, whatever they are.
    #[test]
    fn tokens_are_bound_to_their_ip(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), ttl in 1u64..21600) {
        let issuer = TokenIssuer::with_key(b"property-test-key");
        let now = SystemTime::now();
        let token = issuer.issue(IpAddr::from(a), Duration::from_secs(ttl), now);
        prop_assert!(issuer.verify(&token, IpAddr::from(a), now).is_ok());
        prop_assert_eq!(issuer.verify(&token, IpAddr::from(b), now).is_ok(), a == b);
        prop_assert!(issuer.verify(&token, IpAddr::from(a), now + Duration::from_secs(ttl + 1)).is_err());
    }

    /// Any annotation either parses into a well-formed role ARN or is refused, never panics.
    #[test]
    fn role_annotations_parse_or_are_refused(text in "(arn:aws:iam::[0-9]{10,13}:role/)?\\PC{0,70}") {
        if let Ok(role) = RoleArn::parse(&text) {
            prop_assert_eq!(role.as_str(), text.as_str());
            prop_assert!(role.account().len() == 12 && role.account().bytes().all(|b| b.is_ascii_digit()));
            prop_assert!(!role.name().is_empty() && role.name().len() <= 64);
        }
        let base = BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap();
        if let Ok(joined) = base.join(&text) {
            prop_assert_eq!(joined.account(), "123456789012");
        }
    }

    /// Any namespace annotation compiles or is refused; a bare entry never allows a role of
    /// another account.
    #[test]
    fn namespace_annotations_never_cross_accounts(entries in proptest::collection::vec("[a-z*?/\\[\\]!.-]{0,12}", 0..4), name in "[a-z-]{1,10}", regexp in any::<bool>()) {
        let value = serde_json::to_string(&entries).unwrap();
        let format = if regexp { RestrictionFormat::Regexp } else { RestrictionFormat::Glob };
        let foreign = RoleArn::parse(&format!("arn:aws:iam::999999999999:role/{name}")).unwrap();
        for base in [None, Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap())] {
            if let Ok(allowed) = AllowedRoles::parse(&value, format, base.as_ref(), Some("123456789012")) {
                prop_assert!(allowed.find(&foreign).is_none(), "{} allowed {}", value, foreign);
            }
        }
        let broken = format!("{value}x");
        prop_assert!(AllowedRoles::parse(&broken, format, None, None).is_err());
    }

    /// Every RoleSessionName STS would accept (at most 64 of `[\w+=,.@-]`), never shared by
    /// two pods, and always naming the pod: its last 5 characters (the pod hash that tells
    /// replicas apart) are kept, however long the namespace and the pod name are.
    #[test]
    fn session_names_fit_sts_and_name_the_pod(
        a in (namespace(), pod_name()),
        b in (namespace(), pod_name()),
    ) {
        for (namespace, pod) in [&a, &b] {
            let name = session_name(namespace, pod);
            prop_assert!((2..=64).contains(&name.len()), "{} ({})", name, name.len());
            prop_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)), "{}", name);
            prop_assert!(name.contains(&pod[pod.len().saturating_sub(5)..]), "{} lost {}'s end", name, pod);
            prop_assert!(name.starts_with(&namespace[..namespace.len().min(20)]), "{} lost {}'s start", name, namespace);
        }
        if a != b {
            prop_assert_ne!(session_name(&a.0, &a.1), session_name(&b.0, &b.1), "{:?} and {:?}", a, b);
        }
        // A pod that differs from another only in its replica suffix, as replicas do.
        let sibling = format!("{}{}", &a.1[..a.1.len() - 1], if a.1.ends_with('z') { 'y' } else { 'z' });
        prop_assert_ne!(session_name(&a.0, &a.1), session_name(&a.0, &sibling));
    }

    /// Interface patterns parse or are refused; what parses prints back to itself.
    #[test]
    fn interface_patterns_round_trip(text in "!?[a-z0-9.@:_ -]{0,17}\\+?(,[a-z0-9+!]{0,8}){0,3}") {
        if let Ok(interfaces) = InterfaceMatch::parse(&text) {
            let again = InterfaceMatch::parse(&interfaces.to_string()).unwrap();
            prop_assert_eq!(again, interfaces.clone());
            prop_assert!(interfaces.patterns().iter().all(|p| p.name.len() <= 15));
        }
    }
}
