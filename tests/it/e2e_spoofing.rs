//! A pod can be nobody but itself, even on a shared bridge: end to end, as root, with an
//! attacker pod holding only `CAP_NET_RAW` (what containerd grants every container), speaking
//! raw frames with scapy. Each attack is first shown to work with `--bind-pod-ports=false`
//! (kube2iam's behaviour), then to get nothing with the binding on.

use std::time::Duration;

use iamlet_testkit::e2e::{E2e, pod_request, spoof_attack};
use iamlet_testkit::netns::{Attach, Netns, mac_of};
use nix::sys::signal::Signal;
use serde_json::Value;

const VICTIM_ROLE: &str = "/latest/meta-data/iam/security-credentials/victim-role";

/// The AccessKeyId in an IMDS credentials document.
fn access_key(document: &str) -> String {
    let json = &document[document.find('{').unwrap_or_else(|| panic!("no document in {document:?}"))..];
    let value: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    value["AccessKeyId"].as_str().unwrap().to_string()
}

/// The victim asks for its credentials, so the node's neighbour entry and the bridge's
/// forwarding entry for it are its own again (as after any attack, once the victim speaks).
async fn victim_speaks(victim: &Netns, node: &Netns) -> (u16, String) {
    node.ok("ip", &["neigh", "flush", "dev", "cni0"]);
    pod_request(victim, VICTIM_ROLE, Duration::from_secs(5)).await.expect("the victim is answered")
}

fn neighbour_of(node: &Netns, ip: &str) -> String {
    node.ok("ip", &["neigh", "show", ip, "dev", "cni0"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_pod_with_cap_net_raw_cannot_pass_for_another_on_a_bridge() {
    let mut e2e = E2e::new("spoof");
    let victim = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("victim-role"));
    let attacker = e2e.add_pod("veth2", Attach::Bridge, "10.42.0.11", Some("attacker-role"));
    let victim_mac = mac_of(e2e.pod_ns(victim), "eth0");
    let gateway_mac = mac_of(e2e.node(), "cni0");
    let attack = |e2e: &E2e, mode: &str| {
        spoof_attack(e2e.pod_ns(attacker), mode, ("10.42.0.10", &victim_mac), ("10.42.0.1", &gateway_mac), VICTIM_ROLE)
    };

    // Without the binding, as with kube2iam: both attacks get the victim's very credentials.
    let mut agent = e2e.start_agent(&["--host-interface=cni0", "--bind-pod-ports=false"]).await;
    let (status, document) = victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
    assert_eq!(status, 200, "{document}");
    let victims_key = access_key(&document);
    for mode in ["arp", "mac"] {
        victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
        let got = attack(&e2e, mode);
        assert_eq!(got["answered"], true, "{mode}: the attack works without the binding: {got}\n{}", agent.log());
        let response = got["response"].as_str().unwrap();
        assert!(response.starts_with("HTTP/1.0 200"), "{mode}: {response}");
        assert_eq!(access_key(response), victims_key, "{mode}: the victim's own credentials");
    }
    assert!(neighbour_of(e2e.node(), "10.42.0.10").contains("lladdr"), "the node learnt the forged claim");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));

    // With it (the default): neither attack gets an answer, the node's neighbour entry for the
    // victim keeps the victim's MAC, and the victim is served its own role throughout.
    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    for mode in ["arp", "mac"] {
        victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
        let got = attack(&e2e, mode);
        assert_eq!(got["answered"], false, "{mode}: {got}\n{}", agent.log());
        let neighbour = neighbour_of(e2e.node(), "10.42.0.10");
        assert!(neighbour.contains(&victim_mac), "{mode}: the node's entry still names the victim: {neighbour}");
        let (status, document) = pod_request(e2e.pod_ns(victim), VICTIM_ROLE, Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 200, "{mode}: {document}");
        assert!(!access_key(&document).is_empty(), "{document}");
    }
    let (status, _) = pod_request(
        e2e.pod_ns(attacker),
        "/latest/meta-data/iam/security-credentials/attacker-role",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "the attacker is still served as itself");
    for family in ["arp", "ipv4", "ether"] {
        let selector = format!("iamlet_spoofed_packets_total{{family=\"{family}\"}}");
        iamlet_testkit::eventually(10, &format!("{family} drops to be counted"), async || {
            agent.metric(&selector).await.is_some_and(|n| n > 0.0)
        })
        .await;
    }
    assert_eq!(agent.metric("iamlet_pods_unbound").await, Some(0.0));
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
}
