//! The pod index: source IP → pod, fed by watch events. Plain data, no I/O, no locks.
//!
//! IPs are reused: a new pod can get the address of one that is still terminating, and the
//! watch may deliver the two in either order. So each IP keeps every pod that claims it and
//! the lookup picks the rightful owner (see [`PodIndex::lookup`]), instead of the last write
//! winning as in kube2iam.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::pod::PodIdentity;

/// What an update did, so the caller can prefetch for new pods and forget removed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A pod appeared or changed in a way that matters (IPs or annotations).
    Upserted(Arc<PodIdentity>),
    /// A pod left the index.
    Removed(Arc<PodIdentity>),
    /// Something a pod's role depends on besides the pod changed (its ServiceAccount's
    /// role): resolve it again if it is still on the node. Sent by another watch than the
    /// pods', so it may arrive after the pod's removal, and must then change nothing.
    Reresolve(Arc<PodIdentity>),
}

/// Pods by uid and by IP.
#[derive(Debug, Default)]
pub struct PodIndex {
    by_uid: HashMap<String, Arc<PodIdentity>>,
    by_ip: HashMap<IpAddr, Vec<Arc<PodIdentity>>>,
}

impl PodIndex {
    /// Adds or replaces the pod with this uid. Returns the change, or `None` if nothing that
    /// matters to iamlet changed (status heartbeats and the like).
    pub fn upsert(&mut self, pod: PodIdentity) -> Option<Change> {
        if self.by_uid.get(&pod.uid).is_some_and(|old| **old == pod) {
            return None;
        }
        self.unlink(&pod.uid);
        let pod = Arc::new(pod);
        for ip in &pod.ips {
            self.by_ip.entry(*ip).or_default().push(pod.clone());
        }
        self.by_uid.insert(pod.uid.clone(), pod.clone());
        Some(Change::Upserted(pod))
    }

    /// Removes the pod with this uid, if present.
    pub fn remove(&mut self, uid: &str) -> Option<Change> {
        self.unlink(uid).map(Change::Removed)
    }

    /// Replaces the whole content with a fresh listing (after a watch restart), returning
    /// the changes: pods missing from the listing are removed, as if deleted.
    pub fn replace_all(&mut self, pods: impl IntoIterator<Item = PodIdentity>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for pod in pods {
            listed.insert(pod.uid.clone());
            changes.extend(self.upsert(pod));
        }
        let stale: Vec<String> = self.by_uid.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
        changes.extend(stale.iter().filter_map(|uid| self.remove(uid)));
        changes
    }

    /// The pod that owns `ip`: one not terminating before one that is, a running one before
    /// a pending one, then the newest. A terminating pod never wins over a live one, and one
    /// whose containers have all stopped owns nothing: its IP is then unknown until the watch
    /// delivers the next owner, so a request waits for it instead of getting the old role.
    pub fn lookup(&self, ip: &IpAddr) -> Option<&Arc<PodIdentity>> {
        self.by_ip
            .get(ip)?
            .iter()
            .filter(|pod| pod.owns_its_ips())
            .max_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.uid.cmp(&b.uid)))
    }

    /// Number of pods indexed.
    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// Every indexed pod, in no particular order.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodIdentity>> {
        self.by_uid.values()
    }

    fn unlink(&mut self, uid: &str) -> Option<Arc<PodIdentity>> {
        let old = self.by_uid.remove(uid)?;
        for ip in &old.ips {
            if let Some(claims) = self.by_ip.get_mut(ip) {
                claims.retain(|p| p.uid != uid);
                if claims.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        Some(old)
    }
}

fn rank(pod: &PodIdentity) -> (bool, bool, i64) {
    (!pod.terminating, pod.running, pod.created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: &str) -> PodIdentity {
        PodIdentity {
            namespace: "ns".into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
            ips: vec![ip.parse().unwrap()],
            running: true,
            created: 100,
            ..PodIdentity::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn looks_up_every_address_of_a_dual_stack_pod() {
        let mut index = PodIndex::default();
        let mut p = pod("a", "10.0.0.1");
        p.ips.push(ip("fd00::1"));
        index.upsert(p);
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "a");
        assert_eq!(index.lookup(&ip("fd00::1")).unwrap().uid, "a");
        assert!(index.lookup(&ip("10.0.0.2")).is_none());
    }

    #[test]
    fn unchanged_updates_report_nothing() {
        let mut index = PodIndex::default();
        assert!(index.upsert(pod("a", "10.0.0.1")).is_some());
        assert!(index.upsert(pod("a", "10.0.0.1")).is_none());
        let mut moved = pod("a", "10.0.0.2");
        moved.role_annotation = Some("app".into());
        assert!(matches!(index.upsert(moved), Some(Change::Upserted(_))));
        assert!(index.lookup(&ip("10.0.0.1")).is_none(), "the old address is released");
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn removal_releases_the_ip() {
        let mut index = PodIndex::default();
        index.upsert(pod("a", "10.0.0.1"));
        assert!(matches!(index.remove("a"), Some(Change::Removed(p)) if p.uid == "a"));
        assert!(index.lookup(&ip("10.0.0.1")).is_none());
        assert!(index.remove("a").is_none());
        assert!(index.is_empty());
    }

    #[test]
    fn ip_reuse_goes_to_the_live_newer_pod_in_any_order() {
        let mut old = pod("old", "10.0.0.1");
        old.created = 50;
        let mut new = pod("new", "10.0.0.1");
        new.created = 60;
        new.running = false; // still pending, but the old one is terminating
        let mut terminating = old.clone();
        terminating.terminating = true;

        // The watch may deliver the new pod before or after the old one starts terminating.
        for order in [vec![&old, &new, &terminating], vec![&old, &terminating, &new], vec![&new, &terminating]] {
            let mut index = PodIndex::default();
            for p in order {
                index.upsert(p.clone());
            }
            assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "new");
        }

        // Two live pods on one IP (a stale entry): running beats pending, newer beats older.
        let mut index = PodIndex::default();
        index.upsert(old.clone());
        index.upsert(new.clone());
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "old", "running beats pending");
        let mut running_new = new.clone();
        running_new.running = true;
        index.upsert(running_new);
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "new", "newer beats older");
        index.remove("new");
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "old", "the other claim remains");
    }

    #[test]
    fn a_terminating_pod_never_wins_over_a_live_one() {
        let mut index = PodIndex::default();
        let mut terminating = pod("t", "10.0.0.1");
        terminating.terminating = true;
        terminating.created = 999;
        let mut pending = pod("p", "10.0.0.1");
        pending.running = false;
        pending.created = 1;
        index.upsert(terminating);
        index.upsert(pending);
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "p");
    }

    #[test]
    fn a_stopped_terminating_pod_owns_no_ip() {
        let mut index = PodIndex::default();
        let mut old = pod("old", "10.0.0.1");
        old.terminating = true;
        index.upsert(old.clone());
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "old", "still shutting down: served");
        old.stopped = true;
        index.upsert(old);
        assert!(index.lookup(&ip("10.0.0.1")).is_none(), "its containers are gone: the IP may be reused");
        let mut new = pod("new", "10.0.0.1");
        new.running = false;
        index.upsert(new);
        assert_eq!(index.lookup(&ip("10.0.0.1")).unwrap().uid, "new");
    }

    #[test]
    fn replace_all_removes_what_the_listing_lacks() {
        let mut index = PodIndex::default();
        index.upsert(pod("a", "10.0.0.1"));
        index.upsert(pod("b", "10.0.0.2"));
        let changes = index.replace_all([pod("b", "10.0.0.2"), pod("c", "10.0.0.3")]);
        assert_eq!(changes.len(), 2, "c added, a removed, b unchanged: {changes:?}");
        assert!(index.lookup(&ip("10.0.0.1")).is_none());
        assert_eq!(index.lookup(&ip("10.0.0.3")).unwrap().uid, "c");
    }
}
