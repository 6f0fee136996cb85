//! IMDSv2 session tokens, issued and checked by iamlet itself and bound to the caller's IP.
//!
//! kube2iam passed token requests through to the node's IMDS and never checked tokens on the
//! credential paths (#241, #382). Here a token is an HMAC over its expiry and the IP it was
//! issued to, under a key drawn at startup: nothing is stored per token, a token is useless
//! from any other IP, and tokens do not survive a restart (SDKs fetch a new one on 401).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The TTL range IMDS accepts, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21600;

const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
const TOKEN_LEN: usize = 1 + 8 + TAG_LEN;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token was not issued to this address")]
    Forged,
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

impl TokenIssuer {
    /// A new issuer with a random key.
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret).expect("the system random generator failed");
        Self::with_key(&secret)
    }

    /// An issuer with a given key (tests).
    pub fn with_key(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn issue(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + ttl.as_secs();
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.push(VERSION);
        token.extend_from_slice(&expiry.to_be_bytes());
        token.extend_from_slice(hmac::sign(&self.key, &signed_bytes(expiry, ip)).as_ref());
        URL_SAFE_NO_PAD.encode(token)
    }

    /// Checks that `token` is ours, unexpired at `now`, and was issued to `ip`.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> Result<(), TokenError> {
        let bytes = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| TokenError::Malformed)?;
        if bytes.len() != TOKEN_LEN || bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let expiry = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        hmac::verify(&self.key, &signed_bytes(expiry, ip), &bytes[9..]).map_err(|_| TokenError::Forged)?;
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

/// What the tag covers: expiry and the IP, with IPv4 and IPv4-mapped IPv6 made one.
fn signed_bytes(expiry: u64, ip: IpAddr) -> [u8; 24] {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&expiry.to_be_bytes());
    let v6 = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    bytes[8..].copy_from_slice(&v6.octets());
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
        assert_eq!(issuer.verify(&token, ip("10.0.0.2"), now), Err(TokenError::Forged));
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let other = TokenIssuer::new().issue(ip("10.0.0.1"), Duration::from_secs(60), now);
        assert_eq!(issuer.verify(&other, ip("10.0.0.1"), now), Err(TokenError::Forged), "another key");

        // Extending one's own token's expiry breaks the tag.
        let mut bytes = URL_SAFE_NO_PAD.decode(issuer.issue(ip("10.0.0.1"), Duration::from_secs(1), now)).unwrap();
        bytes[8] = bytes[8].wrapping_add(100);
        assert_eq!(issuer.verify(&URL_SAFE_NO_PAD.encode(bytes), ip("10.0.0.1"), now), Err(TokenError::Forged));

        for garbage in ["", "abc", "!!!!", &"A".repeat(55), &"A".repeat(5000)] {
            assert_eq!(issuer.verify(garbage, ip("10.0.0.1"), now), Err(TokenError::Malformed), "{garbage:?}");
        }
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
