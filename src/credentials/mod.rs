//! Credentials: STS AssumeRole, the cache in front of it, prefetch and refresh-ahead.
//!
//! SDKs give the metadata service about one second (botocore: 1 s, one attempt), and STS
//! can take longer than that (kube2iam #31, #52). So credentials are fetched as soon as a pod
//! with a role appears, refreshed in the background well before they expire, and a request
//! for a known pod is answered from memory.

mod cache;
#[cfg(test)]
mod fake;
mod prefetch;
mod sts;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use cache::{CredentialCache, CredentialError, StsSettings};
pub use prefetch::Prefetcher;
pub use sts::{AwsSts, INTERMEDIATE_REFRESH_BEFORE, RoleAssumer, StsClientSettings, StsError, global_endpoint};

/// Temporary credentials from AssumeRole.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &humantime::format_rfc3339_seconds(self.expiration))
            .finish_non_exhaustive()
    }
}

/// Credentials as cached: when they were obtained, and their rendered response, made once
/// per credential rather than once per request.
#[derive(Debug)]
pub struct Issued {
    pub credentials: Credentials,
    pub obtained: SystemTime,
    rendered: OnceLock<Bytes>,
}

impl Issued {
    pub fn new(credentials: Credentials, obtained: SystemTime) -> Self {
        Self { credentials, obtained, rendered: OnceLock::new() }
    }

    /// Time left before expiry at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.credentials.expiration.duration_since(now).unwrap_or_default()
    }

    /// The response body, rendered by `render` the first time only.
    pub fn rendered(&self, render: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.rendered.get_or_init(|| render(self)).clone()
    }
}
