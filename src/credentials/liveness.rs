//! Which sessions still have a pod on the node, and which fetches are under way for them: the
//! one owner of credential liveness. The prefetcher tells it of pods arriving and departing;
//! the cache asks it before keeping what a fetch brought back and when it refreshes.
//!
//! A session is what [`CredentialKey::session_id`] names: in `pod` scope `<namespace>.<pod>`,
//! which a StatefulSet's pod recreated under the same name shares with the pod it replaces;
//! in a shared scope a role's session, which every pod of that role (and ServiceAccount)
//! shares. So a session departs only with its last pod. A fetch
//! inserts its result after it completes, so a session that departs while one is under way is
//! marked, and the fetch takes its result back; a pod that arrives again under the session
//! before the fetch completes wants it after all, and clears the mark. What a departed
//! session kept, the cache forgets here.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::CredentialCache;
use crate::resolve::CredentialKey;

#[derive(Debug, Default)]
struct State {
    /// Every pod on the node (by uid), with its session: in `pod` scope with or without a
    /// role, in a shared scope none without one.
    pods: HashMap<String, Option<Arc<str>>>,
    /// How many of those pods have each session: asked on every refresh of every key.
    sessions: HashMap<Arc<str>, usize>,
    /// Fetches under way, by session.
    in_flight: HashMap<Arc<str>, InFlight>,
}

impl State {
    /// One pod less has `session`; whether others still have it.
    fn leave(&mut self, session: &Arc<str>) -> bool {
        match self.sessions.get_mut(session) {
            Some(count) if *count > 1 => {
                *count -= 1;
                true
            }
            _ => {
                self.sessions.remove(session);
                false
            }
        }
    }
}

#[derive(Debug, Default)]
struct InFlight {
    count: usize,
    /// The session's last pod departed since these fetches began.
    departed: bool,
}

/// What a pod's arrival (or update) did.
#[derive(Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The pod had not been seen.
    pub first_sight: bool,
    /// The session the pod had before, now without a pod (a shared scope's pod whose role
    /// changed): what it kept should go, fetches under way included.
    pub left: Option<Arc<str>>,
}

/// What the pods on the node keep alive. Cheap to share; every method takes the lock once.
#[derive(Debug, Default)]
pub struct Liveness {
    state: Mutex<State>,
}

impl State {
    /// `session` has no pod left: the fetches under way for it must not keep their results.
    fn mark_departed(&mut self, session: &Arc<str>) {
        if let Some(fetching) = self.in_flight.get_mut(session) {
            fetching.departed = true;
        }
    }
}

impl Liveness {
    /// The pod `uid` is on the node under `session` (arriving, or updated; no session: a
    /// shared scope's pod without a role).
    pub fn arrived(&self, uid: &str, session: Option<&Arc<str>>) -> Arrival {
        let mut state = self.state.lock();
        if let Some(session) = session {
            if let Some(fetching) = state.in_flight.get_mut(session) {
                fetching.departed = false;
            }
            *state.sessions.entry(session.clone()).or_default() += 1;
        }
        let before = state.pods.insert(uid.to_string(), session.cloned());
        let first_sight = before.is_none();
        let left = match before.flatten() {
            Some(before) if !state.leave(&before) => {
                state.mark_departed(&before);
                Some(before)
            }
            _ => None,
        };
        Arrival { first_sight, left }
    }

    /// The pod `uid` left the node. Returns its session when no other pod has it: that
    /// session has departed, and what it kept should go (fetches under way included).
    pub fn departed(&self, uid: &str) -> Option<Arc<str>> {
        let mut state = self.state.lock();
        let session = state.pods.remove(uid).flatten()?;
        if state.leave(&session) {
            return None;
        }
        state.mark_departed(&session);
        Some(session)
    }

    /// Whether the pod `uid` is on the node.
    pub fn knows(&self, uid: &str) -> bool {
        self.state.lock().pods.contains_key(uid)
    }

    /// Whether another pod than `uid` (a StatefulSet's, recreated under the same name, or
    /// any pod of a shared session) has `session`.
    pub fn shared(&self, uid: &str, session: &str) -> bool {
        let state = self.state.lock();
        let own = state.pods.get(uid).is_some_and(|s| s.as_deref() == Some(session));
        state.sessions.get(session).is_some_and(|count| *count > usize::from(own))
    }

    /// Whether a pod on the node has `session`.
    pub fn is_live(&self, session: &str) -> bool {
        self.state.lock().sessions.contains_key(session)
    }

    /// Counts a fetch for `session` under way until the returned guard is dropped.
    pub fn fetching(&self, session: &Arc<str>) -> Fetching<'_> {
        self.state.lock().in_flight.entry(session.clone()).or_default().count += 1;
        Fetching { liveness: self, session: session.clone() }
    }

    /// How many pods the node has, and how many sessions have fetches under way (for tests
    /// and `/debug/store`).
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.pods.len(), state.in_flight.len())
    }
}

/// A fetch under way for a session; the count goes down when dropped.
pub struct Fetching<'a> {
    liveness: &'a Liveness,
    session: Arc<str>,
}

impl Fetching<'_> {
    /// Whether the session's last pod departed since this fetch began: its result must not
    /// stay.
    pub fn departed(&self) -> bool {
        self.liveness.state.lock().in_flight.get(&self.session).is_some_and(|f| f.departed)
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut state = self.liveness.state.lock();
        if let Some(fetching) = state.in_flight.get_mut(&self.session) {
            fetching.count -= 1;
            if fetching.count == 0 {
                state.in_flight.remove(&self.session);
            }
        }
    }
}

impl CredentialCache {
    /// Drops `key` (its pod is gone): no more refreshes for it.
    pub async fn forget(&self, key: &CredentialKey) {
        self.entries.invalidate(key).await;
        if let Some(failures) = &self.failures {
            failures.invalidate(key).await;
        }
    }

    /// Forgets every key of the session `session` (see [`CredentialKey::session_id`]) but
    /// `keep`: when its last pod goes, or the pod's role changes, its keys go too, whether
    /// prefetched or made by a request. (When the pod went, [`Liveness::departed`] has marked
    /// the fetches under way first, so none of them brings a key back afterwards.)
    pub async fn forget_session(&self, session: &str, keep: Option<&CredentialKey>) {
        let stale = |key: &CredentialKey| &*key.session_id() == session && Some(key) != keep;
        let keys: Vec<Arc<CredentialKey>> = self.entries.iter().map(|(key, _)| key).filter(|k| stale(k)).collect();
        let failed: Vec<Arc<CredentialKey>> = self
            .failures
            .iter()
            .flat_map(|failures| failures.iter().map(|(key, _)| key))
            .filter(|k| stale(k))
            .collect();
        for key in keys.iter().chain(&failed) {
            self.forget(key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::credentials::fake::{FakeSts, arrives, cache, key};

    fn session(text: &str) -> Arc<str> {
        text.into()
    }

    #[test]
    fn a_session_departs_with_its_last_pod() {
        let live = Liveness::default();
        let db = session("shop.db-0");
        assert_eq!(live.arrived("a", Some(&db)), Arrival { first_sight: true, left: None });
        assert_eq!(live.arrived("a", Some(&db)), Arrival { first_sight: false, left: None });
        // The StatefulSet recreates db-0 before the old pod's removal is seen.
        live.arrived("b", Some(&db));
        assert!(live.shared("a", "shop.db-0"));
        assert_eq!(live.departed("a"), None, "b still has the session");
        assert!(live.is_live("shop.db-0"));
        assert_eq!(live.departed("b").as_deref(), Some("shop.db-0"));
        assert!(!live.is_live("shop.db-0") && live.departed("b").is_none());
        assert_eq!(live.counts(), (0, 0));
    }

    #[test]
    fn a_fetch_under_way_learns_that_its_session_departed_unless_a_pod_came_back() {
        let live = Liveness::default();
        let db = session("shop.db-0");
        live.arrived("a", Some(&db));
        let fetch = live.fetching(&db);
        assert!(!fetch.departed());
        live.departed("a");
        assert!(fetch.departed(), "the result must not stay");
        live.arrived("b", Some(&db));
        assert!(!fetch.departed(), "a pod under the same session wants it after all");
        drop(fetch);
        assert_eq!(live.counts(), (1, 0), "nothing kept for a fetch that ended");
    }

    #[test]
    fn a_shared_session_departs_when_its_last_pod_leaves_it_for_another_role() {
        let live = Liveness::default();
        let (a, b) = (session("arn:role/a#iamlet@n"), session("arn:role/b#iamlet@n"));
        live.arrived("p1", Some(&a));
        live.arrived("p2", Some(&a));
        assert_eq!(live.arrived("p1", Some(&b)).left, None, "p2 still has role a's session");
        assert!(!live.shared("p2", &a) && live.is_live(&a));
        let fetch = live.fetching(&a);
        assert_eq!(live.arrived("p2", None).left.as_deref(), Some(&*a), "p2 lost its role: a has no pod left");
        assert!(fetch.departed() && !live.is_live(&a) && live.knows("p2"));
        assert_eq!(live.departed("p2"), None, "no session of its own");
        assert_eq!(live.departed("p1").as_deref(), Some(&*b));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_under_way_when_its_pod_goes_leaves_nothing_behind() {
        let sts = FakeSts::new(Duration::from_secs(3600), Duration::from_millis(500));
        let cache = cache(&sts, Duration::ZERO);
        arrives(&cache, "u1", "ns.gone");
        let asking = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key("ns.gone")).await }
        });
        while sts.calls() < 1 {
            tokio::task::yield_now().await; // until the call is under way
        }
        let departed = cache.liveness.departed("u1").expect("its last pod");
        cache.forget_session(&departed, None).await;
        assert!(asking.await.unwrap().is_err(), "the departed pod's request gets nothing");
        assert!(cache.snapshot().is_empty(), "nothing of the departed pod stays to be refreshed");
        assert_eq!(cache.liveness.counts(), (0, 0));

        // The same session under a new pod (a StatefulSet's), arriving while the fetch of
        // the old one is under way: what the fetch brings is the new pod's, and stays.
        arrives(&cache, "u2", "ns.gone");
        let asking = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key("ns.gone")).await }
        });
        while sts.calls() < 2 {
            tokio::task::yield_now().await;
        }
        let departed = cache.liveness.departed("u2").expect("its last pod");
        cache.forget_session(&departed, None).await;
        arrives(&cache, "u3", "ns.gone");
        assert!(asking.await.unwrap().is_ok());
        assert_eq!(cache.snapshot().len(), 1, "the new pod's credentials are cached");
        assert_eq!(sts.calls(), 2);
    }
}
