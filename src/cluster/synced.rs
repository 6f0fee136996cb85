//! Whether a store has applied its first complete listing: one rule for the pod, namespace
//! and ServiceAccount stores.
//!
//! Before its first listing a store knows nothing, and "nothing there" would be a wrong
//! answer (no pod at this IP, no allow-list, no ServiceAccount role and so the default role).
//! So each store is unknown until its watch's first listing has been applied whole, and
//! synced for good from then on: a re-list after a 410 replaces the content atomically and
//! never makes a store unknown again. Readiness and requests wait on the same signal.

use tokio::sync::watch;

/// A store's "synced" signal. Cheap to read; waiters are woken once, at the first listing.
#[derive(Debug)]
pub struct Synced(watch::Sender<bool>);

impl Default for Synced {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Synced {
    /// The first complete listing has been applied. Returns whether this was the first.
    pub fn mark(&self) -> bool {
        !self.0.send_replace(true)
    }

    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the store has synced (at once when it has).
    pub async fn wait(&self) {
        let _ = self.0.subscribe().wait_for(|synced| *synced).await;
    }

    /// A handle that says, and can be awaited for, whether the store has synced: what
    /// readiness is built from.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_until_the_first_listing_then_synced_for_good() {
        let synced = Synced::default();
        let mut handle = synced.subscribe();
        assert!(!synced.is_synced() && !*handle.borrow());
        let waiter = tokio::spawn(async move { handle.wait_for(|s| *s).await.is_ok() });
        assert!(synced.mark(), "the first listing");
        assert!(waiter.await.unwrap());
        assert!(!synced.mark(), "a re-list is not the first");
        assert!(synced.is_synced());
        synced.wait().await;
    }
}
