//! Which port each pod address is bound to, from the CNI's records: what the kernel sets are
//! filled with, and what a request's pod is checked against. Pure.
//!
//! Two records can claim one address when a runtime crashed before it ran the CNI's DEL (the
//! record outlives the pod, and IPAM hands the address out again). The newer record wins: it
//! is the CNI's latest word on that address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use macaddr::MacAddr6 as Mac;

use super::record::{PortRecord, RecordedPod};

/// A pod's port as bound: the host side of its link, its MAC (bridges need it) and addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoundPort {
    pub port: String,
    pub mac: Option<Mac>,
    pub ips: Vec<IpAddr>,
}

/// The owner of one address: its port and the pod the runtime named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub port: String,
    pub pod: Option<RecordedPod>,
}

/// Every bound address on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortIndex {
    owners: HashMap<IpAddr, Owner>,
    ports: Vec<BoundPort>,
    /// Records that lost an address to a newer one (file names), for the log.
    pub superseded: Vec<String>,
}

/// Whether a pod may be served on the address a request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The CNI's record binds the address to this pod's port.
    Bound,
    /// Refused: why, for the pod's Event and the answer.
    Unbound(String),
}

impl PortIndex {
    /// Builds the index from `(file name, modified, record)`.
    pub fn build(mut records: Vec<(String, SystemTime, PortRecord)>) -> Self {
        // Newest first, so the first claim of an address is the one that stands.
        records.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut index = Self::default();
        for (file, _, record) in records {
            let ips: Vec<IpAddr> = record.ips.iter().copied().filter(|ip| !index.owners.contains_key(ip)).collect();
            if ips.len() < record.ips.len() {
                index.superseded.push(file);
            }
            if ips.is_empty() {
                continue;
            }
            for ip in &ips {
                index.owners.insert(*ip, Owner { port: record.host_port.clone(), pod: record.pod.clone() });
            }
            index.ports.push(BoundPort { port: record.host_port, mac: record.mac, ips });
        }
        index.ports.sort();
        index
    }

    /// The bound ports, for the kernel's sets.
    pub fn ports(&self) -> &[BoundPort] {
        &self.ports
    }

    pub fn owner(&self, ip: &IpAddr) -> Option<&Owner> {
        self.owners.get(ip)
    }

    /// Whether the pod `namespace/name` (with `uid`) may be served from `ip`: the CNI recorded
    /// `ip` for a port, and the runtime named this pod for it (a record that names no pod is
    /// taken at its address alone).
    pub fn verdict(&self, ip: &IpAddr, namespace: &str, name: &str, uid: &str) -> Verdict {
        let Some(owner) = self.owners.get(ip) else {
            return Verdict::Unbound(format!(
                "iamlet knows no port for {ip}: the CNI left no record of it, so another pod on this node could \
                 pass for this one"
            ));
        };
        match &owner.pod {
            Some(pod)
                if pod.namespace != namespace
                    || pod.name != name
                    || pod.uid.as_deref().is_some_and(|recorded| recorded != uid) =>
            {
                Verdict::Unbound(format!(
                    "the CNI's record gives {ip} (port {}) to pod {}/{}, not this one",
                    owner.port, pod.namespace, pod.name
                ))
            }
            _ => Verdict::Bound,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(port: &str, pod: &str, ips: &[&str]) -> PortRecord {
        PortRecord {
            pod: Some(RecordedPod { namespace: "ns".into(), name: pod.into(), uid: Some(format!("uid-{pod}")) }),
            host_port: port.into(),
            mac: Some("0a:58:00:00:00:01".parse().unwrap()),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn a_pod_is_bound_at_its_recorded_address_and_nowhere_else() {
        let index = PortIndex::build(vec![("a".into(), at(1), record("veth1", "web", &["10.0.0.5"]))]);
        let ip = "10.0.0.5".parse().unwrap();
        assert_eq!(index.verdict(&ip, "ns", "web", "uid-web"), Verdict::Bound);
        assert!(
            matches!(index.verdict(&ip, "ns", "other", "uid-other"), Verdict::Unbound(why) if why.contains("ns/web"))
        );
        assert!(matches!(index.verdict(&ip, "ns", "web", "uid-new"), Verdict::Unbound(_)), "same name, another pod");
        let elsewhere = "10.0.0.6".parse().unwrap();
        assert!(
            matches!(index.verdict(&elsewhere, "ns", "web", "uid-web"), Verdict::Unbound(why) if why.contains("no port"))
        );
    }

    #[test]
    fn of_two_records_claiming_one_address_the_newer_wins() {
        let index = PortIndex::build(vec![
            ("stale".into(), at(1), record("veth-old", "gone", &["10.0.0.5"])),
            ("fresh".into(), at(2), record("veth-new", "web", &["10.0.0.5"])),
        ]);
        assert_eq!(index.owner(&"10.0.0.5".parse().unwrap()).unwrap().port, "veth-new");
        assert_eq!(index.ports().len(), 1, "the stale port binds nothing");
        assert_eq!(index.superseded, ["stale"]);
    }
}
