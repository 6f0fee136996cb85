//! Credentials moving between agents in a hand-over: the predecessor's cache exported, the
//! successor adopting it (so it makes no AssumeRole call for what was cached), and the
//! predecessor retiring (so the two never refresh the same keys).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::cache::MIN_VALIDITY;
use super::{CredentialCache, Issued};
use crate::resolve::CredentialKey;

/// Keys adopted from a predecessor that no pod has asked for or been prefetched under yet.
/// Until claimed they are served but not refreshed: a key this agent would not make (its
/// flags changed how keys are made) then costs no STS call and goes when it expires.
#[derive(Debug, Default)]
pub(super) struct Adopted {
    unclaimed: Mutex<HashSet<CredentialKey>>,
    /// Whether any is left: the hot path reads only this.
    any: AtomicBool,
}

impl Adopted {
    /// `key` is wanted by a pod on this node.
    pub(super) fn claim(&self, key: &CredentialKey) {
        if self.any.load(Ordering::Relaxed) {
            let mut unclaimed = self.unclaimed.lock();
            unclaimed.remove(key);
            self.any.store(!unclaimed.is_empty(), Ordering::Relaxed);
        }
    }

    pub(super) fn is_unclaimed(&self, key: &CredentialKey) -> bool {
        self.any.load(Ordering::Relaxed) && self.unclaimed.lock().contains(key)
    }
}

impl CredentialCache {
    /// Every cached credential still worth handing over (valid for more than a minute).
    pub fn handover_entries(&self) -> Vec<(Arc<CredentialKey>, Arc<Issued>)> {
        let now = self.clock.now();
        self.entries.iter().filter(|(_, issued)| issued.remaining(now) > MIN_VALIDITY).collect()
    }

    /// Takes `entries` from a predecessor, each with its refresh point: served at once, and
    /// refreshed when due once a pod claims it. Returns how many were adopted.
    pub async fn adopt(&self, entries: Vec<(CredentialKey, Issued)>) -> usize {
        let now = self.clock.now();
        let mut adopted = 0;
        for (key, issued) in entries {
            if issued.remaining(now) <= MIN_VALIDITY {
                continue;
            }
            self.adopted.unclaimed.lock().insert(key.clone());
            self.entries.insert(key, Arc::new(issued)).await;
            adopted += 1;
        }
        self.adopted.any.store(adopted > 0, Ordering::Relaxed);
        adopted
    }

    /// Handed over: the successor refreshes and prefetches from now on; this agent answers
    /// the connections it still serves from what it has.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::credentials::fake::{FakeSts, arrives, cache, key};

    #[tokio::test(start_paused = true)]
    async fn adopted_credentials_are_served_without_sts_and_refreshed_only_once_claimed() {
        // 20 minutes of validity: due for a refresh (30 minutes ahead) as soon as adopted.
        let predecessor_sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let predecessor = cache(&predecessor_sts, Duration::ZERO);
        arrives(&predecessor, "u1", "ns.a");
        let first = predecessor.get(&key("ns.a")).await.unwrap();
        predecessor.get(&key("ns.b")).await.unwrap();
        let handed = predecessor.handover_entries();
        assert_eq!(handed.len(), 2);

        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let successor = cache(&sts, Duration::ZERO);
        let parts = handed.iter().map(|(k, i)| {
            let issued = Issued::new(i.credentials.clone(), i.obtained).refreshed_at(i.refresh_at);
            ((**k).clone(), issued)
        });
        assert_eq!(successor.adopt(parts.collect()).await, 2);
        arrives(&successor, "u1", "ns.a");
        arrives(&successor, "u2", "ns.b");
        let served = successor.get(&key("ns.a")).await.unwrap();
        assert_eq!(served.credentials, first.credentials, "the predecessor's credentials, at once");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sts.calls(), 1, "no AssumeRole for what was cached, but its refresh, since it is due");

        // Both are due (ns.a again: 20-minute credentials always are); only the claimed one
        // is refreshed.
        successor.refresh_due().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sts.calls(), 2);
        let b = successor.entries.get(&key("ns.b")).await.unwrap();
        assert!(
            b.credentials.access_key_id.starts_with("ASIA1-"),
            "ns.b was never claimed: the predecessor's, not refreshed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_cache_neither_refreshes_nor_prefetches() {
        let sts = FakeSts::new(Duration::from_secs(1200), Duration::ZERO);
        let cache = cache(&sts, Duration::ZERO);
        arrives(&cache, "u1", "ns.a");
        cache.get(&key("ns.a")).await.unwrap();
        cache.retire();
        cache.refresh_due().await;
        cache.prefetch(key("ns.b"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sts.calls(), 1);
    }
}
