//! IMDSv2 session tokens, issued and checked by iamlet itself and bound to the caller's IP.
//!
//! kube2iam passed token requests through to the node's IMDS and never checked tokens on the
//! credential paths (#241, #382). Here a token carries its expiry and the address it was
//! issued to, under an HMAC with the node's token key: nothing is stored per token, and a
//! token is useless from any other address. The key outlives the process (see
//! [`super::token_key`]): as on EC2, a token stays valid for its whole TTL, across restarts
//! and upgrades. That matters, because not every SDK asks for a new token on a 401: the AWS
//! SDK for Rust's IMDS client keeps its token (6 hours by default) and retries with it.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The TTL range IMDS accepts, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21600;

/// The token format: version, expiry, the address (IPv4 as IPv4-mapped IPv6), the tag.
const VERSION: u8 = 2;
const SIGNED_LEN: usize = 1 + 8 + 16;
const TAG_LEN: usize = 32;
const TOKEN_LEN: usize = SIGNED_LEN + TAG_LEN;

/// The length of a token key, in bytes.
pub const KEY_LEN: usize = 32;

/// Why a token was refused: the 401's text, so whoever reads it knows what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token has expired")]
    Expired,
    /// Made with another key: by another node's metadata service, before the node's last
    /// boot, or by no one.
    #[error("token was not issued by this node's metadata service")]
    NotIssuedHere,
    /// A genuine token, presented from an address it was not issued to.
    #[error("token was issued to another address")]
    OtherAddress,
}

/// Issues and verifies tokens under one secret key.
pub struct TokenIssuer {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer")
    }
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header: a whole number of seconds,
/// 1 to 21600, as IMDS takes it.
pub fn parse_ttl(header: Option<&str>) -> Option<Duration> {
    let seconds: u64 = header?.trim().parse().ok()?;
    TTL_RANGE.contains(&seconds).then(|| Duration::from_secs(seconds))
}

/// A new random token key.
pub fn random_key() -> [u8; KEY_LEN] {
    let mut secret = [0u8; KEY_LEN];
    rand::fill(&mut secret).expect("the system random generator failed");
    secret
}

impl TokenIssuer {
    /// A new issuer with a random key (tokens die with it: tests and benchmarks).
    pub fn new() -> Self {
        Self::with_key(&random_key())
    }

    /// An issuer with a given key.
    pub fn with_key(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn issue(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + ttl.as_secs();
        let signed = signed_bytes(expiry, address(ip));
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.extend_from_slice(&signed);
        token.extend_from_slice(hmac::sign(&self.key, &signed).as_ref());
        URL_SAFE_NO_PAD.encode(token)
    }

    /// Checks that `token` is ours, was issued to `ip`, and is unexpired at `now`, in that
    /// order: what a 401 says is the first of these that fails.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> Result<(), TokenError> {
        let mut bytes = [0u8; TOKEN_LEN + 3];
        let len = URL_SAFE_NO_PAD.decode_slice(token.trim(), &mut bytes).map_err(|_| TokenError::Malformed)?;
        if len != TOKEN_LEN || bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = bytes[..TOKEN_LEN].split_at(SIGNED_LEN);
        hmac::verify(&self.key, signed, tag).map_err(|_| TokenError::NotIssuedHere)?;
        let issued_to: [u8; 16] = signed[9..].try_into().expect("16 bytes");
        if issued_to != address(ip).octets() {
            return Err(TokenError::OtherAddress);
        }
        let expiry = u64::from_be_bytes(signed[1..9].try_into().expect("8 bytes"));
        if now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

impl Default for TokenIssuer {
    fn default() -> Self {
        Self::new()
    }
}

/// The address a token is bound to: IPv4 and IPv4-mapped IPv6 made one.
fn address(ip: IpAddr) -> Ipv6Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// What the tag covers: the version, the expiry and the address.
fn signed_bytes(expiry: u64, address: Ipv6Addr) -> [u8; SIGNED_LEN] {
    let mut bytes = [0u8; SIGNED_LEN];
    bytes[0] = VERSION;
    bytes[1..9].copy_from_slice(&expiry.to_be_bytes());
    bytes[9..].copy_from_slice(&address.octets());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_token_works_from_its_ip_until_it_expires() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let token = issuer.issue(ip("10.0.0.1"), Duration::from_secs(60), now);
        assert_eq!(issuer.verify(&token, ip("10.0.0.1"), now), Ok(()));
        assert_eq!(issuer.verify(&token, ip("::ffff:10.0.0.1"), now), Ok(()), "mapped form is the same address");
        assert_eq!(issuer.verify(&token, ip("10.0.0.1"), now + Duration::from_secs(59)), Ok(()));
        assert_eq!(issuer.verify(&token, ip("10.0.0.1"), now + Duration::from_secs(61)), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_is_refused_from_another_ip() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let token = issuer.issue(ip("10.0.0.1"), Duration::from_secs(60), now);
        assert_eq!(issuer.verify(&token, ip("10.0.0.2"), now), Err(TokenError::OtherAddress));
        let expired = now + Duration::from_secs(61);
        assert_eq!(issuer.verify(&token, ip("10.0.0.2"), expired), Err(TokenError::OtherAddress), "the address first");
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let other = TokenIssuer::new().issue(ip("10.0.0.1"), Duration::from_secs(60), now);
        assert_eq!(issuer.verify(&other, ip("10.0.0.1"), now), Err(TokenError::NotIssuedHere), "another key");

        // Extending one's own token's expiry, or moving it to another address, breaks the tag.
        let mine = URL_SAFE_NO_PAD.decode(issuer.issue(ip("10.0.0.1"), Duration::from_secs(1), now)).unwrap();
        let mut longer = mine.clone();
        longer[8] = longer[8].wrapping_add(100);
        assert_eq!(issuer.verify(&URL_SAFE_NO_PAD.encode(longer), ip("10.0.0.1"), now), Err(TokenError::NotIssuedHere));
        let mut moved = mine;
        moved[24] = 2; // ::ffff:10.0.0.2
        assert_eq!(issuer.verify(&URL_SAFE_NO_PAD.encode(moved), ip("10.0.0.2"), now), Err(TokenError::NotIssuedHere));

        for garbage in ["", "abc", "!!!!", &"A".repeat(55), &"A".repeat(76), &"A".repeat(5000)] {
            assert_eq!(issuer.verify(garbage, ip("10.0.0.1"), now), Err(TokenError::Malformed), "{garbage:?}");
        }
    }

    #[test]
    fn a_token_outlives_its_issuer_under_the_same_key() {
        let key = random_key();
        let now = SystemTime::now();
        let token = TokenIssuer::with_key(&key).issue(ip("10.0.0.1"), Duration::from_secs(21600), now);
        let successor = TokenIssuer::with_key(&key);
        assert_eq!(successor.verify(&token, ip("10.0.0.1"), now + Duration::from_secs(3600)), Ok(()));
    }

    #[test]
    fn ttl_header_is_checked_like_imds() {
        assert_eq!(parse_ttl(Some("21600")), Some(Duration::from_secs(21600)));
        assert_eq!(parse_ttl(Some(" 1 ")), Some(Duration::from_secs(1)));
        for bad in [None, Some(""), Some("0"), Some("21601"), Some("-5"), Some("1.5"), Some("ten")] {
            assert_eq!(parse_ttl(bad), None, "{bad:?}");
        }
    }
}
