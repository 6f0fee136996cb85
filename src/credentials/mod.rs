//! Credentials: STS AssumeRole, the cache in front of it, prefetch and refresh-ahead.
//!
//! SDKs give the metadata service about one second (botocore: 1 s, one attempt), and STS
//! can take longer than that (kube2iam #31, #52). So credentials are fetched as soon as a pod
//! with a role appears, refreshed in the background well before they expire, and a request
//! for a known pod is answered from memory.
//!
//! STS limits AssumeRole per account, across every node: every call waits in one queue
//! (`queue`: a pod's request first) and takes a token of the node's budget (`budget`,
//! `--sts-max-rps`); a throttled or transient failure is tried again after a jittered backoff
//! (`cache::backoff`), a final one never (`sts::classify`).

mod adopt;
mod budget;
mod cache;
#[cfg(test)]
mod fake;
mod liveness;
mod prefetch;
mod queue;
mod recent;
mod refresh;
mod settings;
mod sts;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::cluster::Change;
use crate::resolve::Resolver;
use crate::state::StateDir;

pub use budget::BudgetSettings;
pub use cache::{CredentialCache, CredentialError};
pub use liveness::Liveness;
pub use prefetch::Prefetcher;
pub use refresh::refresh_point;
pub use settings::StsSettings;
pub use sts::{
    AwsSts, Failure, INTERMEDIATE_REFRESH_BEFORE, RoleAssumer, StsClientSettings, StsError, classify, global_endpoint,
};

/// How often every cached credential is checked for a due refresh.
const REFRESH_SCAN_PERIOD: Duration = Duration::from_secs(30);

/// Keeps `cache` ahead of the pods, in `tasks`: the prefetcher follows `changes` (fetching
/// a new pod's credentials at once, forgetting a gone pod's), and every 30 s, once the pod
/// cache has synced (`pods_synced`), what is due is refreshed, for the sessions the
/// prefetcher keeps alive. With a state directory, the sessions asked for in the last
/// minutes are read from it first (an earlier agent's, so their prefetches go first after a
/// crash) and kept there.
pub fn keep_ahead(
    cache: &Arc<CredentialCache>,
    resolver: Arc<Resolver>,
    changes: mpsc::UnboundedReceiver<Change>,
    pods_synced: watch::Receiver<bool>,
    state: Option<StateDir>,
    tasks: &mut JoinSet<()>,
) {
    if let Some(dir) = state {
        match recent::load(&dir, cache.clock.now()) {
            Ok(asked) if !asked.is_empty() => {
                tracing::info!(
                    sessions = asked.len(),
                    "sessions asked for in the minutes before this start: their prefetches go first"
                );
                cache.recent.seed(asked);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, file = recent::FILE, "cannot read the recently asked sessions: prefetches go in any order")
            }
        }
        let watched = cache.clone();
        tasks.spawn(recent::persist(cache.recent.clone(), dir, move || watched.is_retired()));
    }
    tasks.spawn(Prefetcher::new(cache.clone(), resolver).run(changes));
    tasks.spawn(cache.clone().refresh_every(REFRESH_SCAN_PERIOD, pods_synced));
}

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

/// Credentials as cached: when they were obtained, when they are to be refreshed, and their
/// rendered response, made once per credential rather than once per request.
#[derive(Debug)]
pub struct Issued {
    pub credentials: Credentials,
    pub obtained: SystemTime,
    /// When a refresh is due (see [`refresh::refresh_point`]); their expiry unless set.
    pub refresh_at: SystemTime,
    rendered: OnceLock<Bytes>,
}

impl Issued {
    pub fn new(credentials: Credentials, obtained: SystemTime) -> Self {
        let refresh_at = credentials.expiration;
        Self { credentials, obtained, refresh_at, rendered: OnceLock::new() }
    }

    /// The same, due for a refresh at `refresh_at`.
    pub fn refreshed_at(self, refresh_at: SystemTime) -> Self {
        Self { refresh_at, ..self }
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
