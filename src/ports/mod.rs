//! Which port on the node each pod address belongs to, from what the CNI recorded.
//!
//! A request names its pod only by its source address, and on a bridge a pod with
//! `CAP_NET_RAW` can send from any address. What it cannot forge is the port its frames come
//! in on. libcni's result cache ([`record`]) says, for every pod the CNI wired up, the host
//! side of its link, its MAC and its addresses; [`records`] reads it and notices changes;
//! [`index`] answers "whose address is this, and on which port". `netfilter::binding` turns
//! that into kernel rules; the metadata API checks each request's pod against it
//! ([`Ports::verdict`]), so a pod whose port is unknown is refused, never served on its
//! address alone.

pub mod index;
pub mod record;
pub mod records;

use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::RwLock;

pub use index::{BoundPort, Owner, PortIndex, Verdict};

use crate::pod::PodIdentity;

/// The binding as the metadata API sees it: off (or not decided yet, while a predecessor's
/// kernel rules still hold), or on with the current index. Cheap to clone; shared.
#[derive(Debug, Clone, Default)]
pub struct Ports(Arc<RwLock<Option<Arc<PortIndex>>>>);

impl Ports {
    /// Replaces what requests are checked against: `None` turns the check off.
    pub fn publish(&self, index: Option<Arc<PortIndex>>) {
        *self.0.write() = index;
    }

    /// Whether `pod` may be served on a request from `ip`: always, with binding off.
    pub fn verdict(&self, pod: &PodIdentity, ip: &IpAddr) -> Verdict {
        match &*self.0.read() {
            None => Verdict::Bound,
            Some(index) => index.verdict(ip, &pod.namespace, &pod.name, &pod.uid),
        }
    }
}
