//! One entry of libcni's result cache: which host port, MAC and addresses the CNI gave a pod.
//!
//! containerd and CRI-O both run the CNI through libcni, which writes the result of every
//! successful ADD to `/var/lib/cni/results/<network>-<container id>-<ifname>` (a `cniCacheV1`
//! file, root's and written by root only) and deletes it on DEL. The file holds the CNI's own
//! answer: the interfaces it made (the host side has no `sandbox`, the pod side names its
//! network namespace) and the addresses it assigned, plus the Kubernetes arguments the runtime
//! passed (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`). A pod cannot write it, and
//! nothing in it comes from the wire: unlike the neighbour table or a bridge's learned MACs,
//! an attacker's ARP or forged source address changes none of it. Pure: parsing only.

use std::net::IpAddr;

use serde::Deserialize;

use macaddr::MacAddr6 as Mac;

/// What libcni recorded for one pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    /// The pod the runtime said this was for: namespace, name and (recent runtimes) uid.
    pub pod: Option<RecordedPod>,
    /// The host side of the pod's link: the veth on the bridge, or the routed veth
    /// (`cali…`, `eni…`).
    pub host_port: String,
    /// The pod side's MAC, when the CNI reported it (every bridge-based CNI does).
    pub mac: Option<Mac>,
    /// The pod's addresses on this link.
    pub ips: Vec<IpAddr>,
}

/// The Kubernetes arguments the runtime passed to the CNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// Why a cache file gives no port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a libcni result cache entry: {0}")]
    Malformed(String),
    #[error("the CNI's result names no host-side interface")]
    NoHostPort,
    #[error("the CNI's result assigns no address")]
    NoAddress,
    #[error("the host-side interface name {0:?} is not a Linux interface name")]
    BadInterfaceName(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    kind: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    result: Option<CniResult>,
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct Interface {
    name: String,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct IpConfig {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// Parses one cache file's bytes.
///
/// The host port is the last interface with no `sandbox` (the bridge plugin lists the bridge,
/// then the host veth, then the pod's; the routed plugins list the host veth and the pod's).
/// The MAC is the pod-side interface's: the one the addresses point at, else the one in a
/// sandbox. Errors: not `cniCacheV1` JSON, no host-side interface, no address, or an interface
/// name the kernel would not accept (so it can never carry nftables syntax).
pub fn parse(bytes: &[u8]) -> Result<PortRecord, RecordError> {
    let file: CacheFile = serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
    if file.kind != "cniCacheV1" {
        return Err(RecordError::Malformed(format!("kind {:?}", file.kind)));
    }
    let result = file.result.ok_or_else(|| RecordError::Malformed("no result".into()))?;
    let host = result.interfaces.iter().rev().find(|i| i.sandbox.as_deref().unwrap_or("").is_empty());
    let host_port = host.ok_or(RecordError::NoHostPort)?.name.clone();
    if !valid_interface_name(&host_port) {
        return Err(RecordError::BadInterfaceName(host_port));
    }
    let pod_side = result
        .ips
        .iter()
        .find_map(|ip| ip.interface.and_then(|i| result.interfaces.get(i)))
        .filter(|i| i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        .or_else(|| result.interfaces.iter().find(|i| i.sandbox.as_deref().is_some_and(|s| !s.is_empty())));
    let mac = pod_side.and_then(|i| i.mac.as_deref()).and_then(|m| m.parse().ok());
    let ips: Vec<IpAddr> =
        result.ips.iter().filter_map(|ip| ip.address.split('/').next().and_then(|a| a.parse().ok())).collect();
    if ips.is_empty() {
        return Err(RecordError::NoAddress);
    }
    let arg = |key: &str| file.cni_args.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let pod = match (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) {
        (Some(namespace), Some(name)) => Some(RecordedPod { namespace, name, uid: arg("K8S_POD_UID") }),
        _ => None,
    };
    Ok(PortRecord { pod, host_port, mac, ips })
}

/// What the kernel accepts as an interface name: 1 to 15 bytes, no `/`, whitespace or `:`;
/// narrowed here to the characters CNIs use, so a name is always safe to quote.
pub fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libcni wrote for a pod behind flannel (which delegates to the bridge plugin).
    pub const BRIDGE: &str = r#"{"kind":"cniCacheV1","containerId":"4b1f","config":"e30=","ifName":"eth0",
        "networkName":"cbr0","cniArgs":[["IgnoreUnknown","1"],["K8S_POD_NAMESPACE","shop"],
        ["K8S_POD_NAME","web-0"],["K8S_POD_INFRA_CONTAINER_ID","4b1f"],["K8S_POD_UID","9c1d"]],
        "result":{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"6a:8f:01:02:03:04"},
        {"name":"veth5e0a1b2c","mac":"b2:11:22:33:44:55"},
        {"name":"eth0","mac":"0a:58:0a:2a:00:05","sandbox":"/var/run/netns/cni-1234"}],
        "ips":[{"interface":2,"address":"10.42.0.5/24","gateway":"10.42.0.1"},
               {"interface":2,"address":"fd42::5/64","gateway":"fd42::1"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}}"#;

    #[test]
    fn a_bridge_plugin_result_gives_the_host_veth_the_pods_mac_and_its_addresses() {
        let record = parse(BRIDGE.as_bytes()).unwrap();
        assert_eq!(record.host_port, "veth5e0a1b2c");
        assert_eq!(record.mac, Some("0a:58:0a:2a:00:05".parse().unwrap()));
        assert_eq!(record.ips, vec!["10.42.0.5".parse::<IpAddr>().unwrap(), "fd42::5".parse().unwrap()]);
        let pod = record.pod.unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_deref()), ("shop", "web-0", Some("9c1d")));
    }

    #[test]
    fn a_routed_result_gives_the_host_veth_without_a_mac() {
        // The AWS VPC CNI's shape: the host veth, then the pod's interface, no MACs.
        let aws = r#"{"kind":"cniCacheV1","cniArgs":[["K8S_POD_NAMESPACE","a"],["K8S_POD_NAME","b"]],
            "result":{"interfaces":[{"name":"eni3f2a9c1d0b7"},{"name":"eth0","sandbox":"/proc/42/ns/net"}],
            "ips":[{"version":"4","interface":1,"address":"192.168.7.9/32"}]}}"#;
        let record = parse(aws.as_bytes()).unwrap();
        assert_eq!(record.host_port, "eni3f2a9c1d0b7");
        assert_eq!(record.mac, None);
        assert_eq!(record.pod.unwrap().uid, None);
    }

    #[test]
    fn a_result_with_no_host_side_interface_or_no_address_gives_no_port() {
        let no_host = r#"{"kind":"cniCacheV1","result":{"interfaces":[{"name":"eth0","sandbox":"/x"}],
            "ips":[{"address":"10.0.0.1/32"}]}}"#;
        assert_eq!(parse(no_host.as_bytes()), Err(RecordError::NoHostPort));
        let no_ip = r#"{"kind":"cniCacheV1","result":{"interfaces":[{"name":"veth1"}],"ips":[]}}"#;
        assert_eq!(parse(no_ip.as_bytes()), Err(RecordError::NoAddress));
        assert!(matches!(parse(b"{}"), Err(RecordError::Malformed(_))));
        assert!(matches!(parse(br#"{"kind":"other","result":{}}"#), Err(RecordError::Malformed(_))));
        assert!(matches!(parse(b"\xff garbage"), Err(RecordError::Malformed(_))));
    }

    #[test]
    fn an_interface_name_that_could_carry_syntax_is_refused() {
        let quoted = r#"{"kind":"cniCacheV1","result":{"interfaces":[{"name":"v\" drop; #"}],
            "ips":[{"address":"10.0.0.1/32"}]}}"#;
        assert!(matches!(parse(quoted.as_bytes()), Err(RecordError::BadInterfaceName(_))));
        assert!(!valid_interface_name("sixteen-chars-xx"));
        assert!(valid_interface_name("cali1a2b3c4d5e6"));
    }
}
