//! What iamlet keeps of a pod: the few fields that decide its role and who owns an IP, not
//! the whole object. Plain data shared by every module; `cluster` makes it from pod objects.
//!
//! Keeping only these (and only the annotations policy reads, never e.g.
//! `kubectl.kubernetes.io/last-applied-configuration`) keeps memory flat on busy nodes.

use std::net::IpAddr;

/// A pod as the index sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// Every address in `status.podIPs` (dual stack), or `status.podIP` alone on old servers.
    pub ips: Vec<IpAddr>,
    pub role_annotation: Option<String>,
    pub external_id: Option<String>,
    /// `metadata.creationTimestamp` in seconds since the epoch; newer wins on IP reuse.
    pub created: i64,
    /// `metadata.deletionTimestamp` is set: the pod is going away.
    pub terminating: bool,
    /// Every container has terminated (`status.containerStatuses[*].state.terminated`).
    /// With `terminating`, the pod has released its IP: the CNI may already have given it to
    /// a new pod whose update the watch has not delivered yet.
    pub stopped: bool,
    /// `status.phase` is Running.
    pub running: bool,
}

impl PodIdentity {
    /// Whether the pod still owns its IPs: a terminating pod whose containers have all
    /// stopped does not (its graceful shutdown is over; the address may be reused).
    pub fn owns_its_ips(&self) -> bool {
        !(self.terminating && self.stopped)
    }

    /// The role the pod's own annotation names, if it names one (a blank value names none).
    pub fn own_role(&self) -> Option<&str> {
        self.role_annotation.as_deref().filter(|value| !value.trim().is_empty())
    }

    /// `namespace/name`, for logs and messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
