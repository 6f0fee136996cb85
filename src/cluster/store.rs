//! The shared pod cache: the index behind a lock, plus the signals requests wait on.
//!
//! A pod's first metadata request often arrives before the watch has delivered the pod's IP
//! (the race behind kube2iam #46 and kiam #47). Instead of polling with back-off, a request
//! for an unknown IP subscribes to the index's change signal and re-checks on every change,
//! until the pod appears or its deadline passes.

use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use tokio::sync::watch;

use super::Synced;
use super::index::{Change, PodIndex};
use crate::pod::PodIdentity;

/// The pods of this node, shared by the watch task (writer) and requests (readers).
#[derive(Debug)]
pub struct PodStore {
    index: RwLock<PodIndex>,
    /// Bumped after every change; waiters re-check on each bump.
    generation: watch::Sender<u64>,
    /// Whether the first full listing has been applied.
    synced: Synced,
}

impl Default for PodStore {
    fn default() -> Self {
        Self { index: RwLock::default(), generation: watch::channel(0).0, synced: Synced::default() }
    }
}

impl PodStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Applies `update` to the index and wakes every waiter, whether or not it changed
    /// anything: each waiter looks again for its own IP.
    pub fn update<T>(&self, update: impl FnOnce(&mut PodIndex) -> T) -> T {
        let result = update(&mut self.index.write());
        self.generation.send_modify(|g| *g += 1);
        result
    }

    /// Applies a whole listing, then marks the store synced.
    pub fn replace_all(&self, pods: Vec<PodIdentity>) -> Vec<Change> {
        let changes = self.update(|index| index.replace_all(pods));
        self.synced.mark();
        changes
    }

    /// The pod that owns `ip` now.
    pub fn lookup(&self, ip: &IpAddr) -> Option<Arc<PodIdentity>> {
        self.read(|index| index.lookup(ip).cloned())
    }

    /// The pod that owns `ip`, waiting up to `wait` for the watch to deliver it.
    pub async fn wait_for(&self, ip: &IpAddr, wait: Duration) -> Option<Arc<PodIdentity>> {
        // Subscribe before the first look, so a change between the look and the wait is seen.
        let mut changes = self.generation.subscribe();
        if let Some(pod) = self.lookup(ip) {
            return Some(pod);
        }
        let found = async {
            loop {
                if changes.changed().await.is_err() {
                    return None;
                }
                if let Some(pod) = self.lookup(ip) {
                    return Some(pod);
                }
            }
        };
        tokio::time::timeout(wait, found).await.ok().flatten()
    }

    /// Runs `f` with the index read-locked.
    pub fn read<T>(&self, f: impl FnOnce(&PodIndex) -> T) -> T {
        f(&self.index.read())
    }

    /// Whether the first full listing has been applied (see [`Synced`]).
    pub fn synced(&self) -> &Synced {
        &self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: &str) -> PodIdentity {
        PodIdentity { uid: uid.into(), ips: vec![ip.parse().unwrap()], running: true, ..PodIdentity::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_is_answered_when_the_pod_arrives() {
        let store = PodStore::new();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_for(&ip, Duration::from_secs(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.update(|index| index.upsert(pod("other", "10.0.0.8")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "another pod's arrival must not answer the wait");
        store.update(|index| index.upsert(pod("p", "10.0.0.7")));
        assert_eq!(waiter.await.unwrap().unwrap().uid, "p");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline() {
        let store = PodStore::new();
        let started = tokio::time::Instant::now();
        assert!(store.wait_for(&"10.0.0.7".parse().unwrap(), Duration::from_secs(2)).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn synced_after_the_first_listing() {
        let store = PodStore::new();
        assert!(!store.synced().is_synced());
        store.replace_all(vec![pod("a", "10.0.0.1")]);
        store.synced().wait().await;
        assert!(store.synced().is_synced());
        assert_eq!(store.lookup(&"10.0.0.1".parse().unwrap()).unwrap().uid, "a");
    }
}
