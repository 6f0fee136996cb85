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

/// The bridge port the bridge forwards frames for `mac` to.
fn forwarding_port(node: &Netns, mac: &str) -> Option<String> {
    let table = node.ok("bridge", &["fdb", "show", "br", "cni0"]);
    let line = table.lines().find(|line| line.starts_with(mac) && !line.contains("permanent"))?;
    line.split_whitespace().skip_while(|word| *word != "dev").nth(1).map(str::to_string)
}

/// Whether a SYN the attacker forges from `source` to `target` (`ip:port`) got past the
/// node's first hook: the node's connection tracking (after the binding's hook, before the
/// DNAT) has it. Blind (no answer comes back to the attacker), so it shows what the kernel
/// lets through, not what an attacker can read. The frame is handled by the node after the
/// attacker's send returns: an entry is looked for until it shows, for up to 5 s (a dropped
/// SYN costs the full wait).
fn forged_syn_tracked(e2e: &E2e, attacker: &Netns, source: (&str, &str), gateway: (&str, &str), target: &str) -> bool {
    let sent = spoof_attack(attacker, "syn", source, gateway, VICTIM_ROLE, target, 0);
    let sport = sent["sport"].as_u64().unwrap_or_else(|| panic!("{sent}")).to_string();
    let family = if source.0.contains(':') { "ipv6" } else { "ipv4" };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listing =
            e2e.node().exec("conntrack", &["-L", "-f", family, "-p", "tcp", "-s", source.0, "--sport", &sport]);
        if String::from_utf8_lossy(&listing.stdout).contains(&format!("sport={sport}")) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The attacks: each mode against the metadata address (`lldp` takes the forwarding entry
/// with frames to a link-local group address, learnt from outside the bridge hooks), the ARP attack against the agent's
/// own address (`host-ip:8181`), which no DNAT stands in front of, and the ARP attack in
/// priority tags (VLAN 0: one on the claims, two on the TCP frames), which hide ARP and IP
/// from rules that do not look inside tags while the node's stack strips them.
const ATTACKS: [(&str, &str, usize); 5] = [
    ("arp", "169.254.169.254:80", 0),
    ("mac", "169.254.169.254:80", 0),
    ("lldp", "169.254.169.254:80", 0),
    ("arp", "10.254.0.1:8181", 0),
    ("arp", "169.254.169.254:80", 2),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_pod_with_cap_net_raw_cannot_pass_for_another_on_a_bridge() {
    let mut e2e = E2e::new("spoof");
    let victim = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("victim-role"));
    let attacker = e2e.add_pod("veth2", Attach::Bridge, "10.42.0.11", Some("attacker-role"));
    let victim_mac = mac_of(e2e.pod_ns(victim), "eth0");
    let attacker_mac = mac_of(e2e.pod_ns(attacker), "eth0");
    let gateway_mac = mac_of(e2e.node(), "cni0");
    let attack = |e2e: &E2e, mode: &str, target: &str, tags: usize| {
        let (victim, gateway) = (("10.42.0.10", victim_mac.as_str()), ("10.42.0.1", gateway_mac.as_str()));
        spoof_attack(e2e.pod_ns(attacker), mode, victim, gateway, VICTIM_ROLE, target, tags)
    };

    // Without the binding, as with kube2iam: both attacks get the victim's very credentials.
    let mut agent = e2e.start_agent(&["--host-interface=cni0", "--bind-pod-ports=false"]).await;
    let (status, document) = victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
    assert_eq!(status, 200, "{document}");
    let victims_key = access_key(&document);
    for (mode, target, tags) in ATTACKS {
        victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
        let got = attack(&e2e, mode, target, tags);
        assert_eq!(got["answered"], true, "{mode} {target}: works without the binding: {got}\n{}", agent.log());
        let response = got["response"].as_str().unwrap();
        assert!(response.starts_with("HTTP/1.0 200"), "{mode} {target}: {response}");
        assert_eq!(access_key(response), victims_key, "{mode} {target}: the victim's own credentials");
        let taken = match mode {
            "arp" => neighbour_of(e2e.node(), "10.42.0.10").contains(&attacker_mac),
            _ => forwarding_port(e2e.node(), &victim_mac).as_deref() == Some("veth2"),
        };
        assert!(taken, "{mode}: the forged claim took the node's entry for the victim");
    }
    // Blind: a forged source to the agent's own address, and an unbound address to the
    // metadata address, both reach the node.
    let gateway = ("10.42.0.1", gateway_mac.as_str());
    let forged = [
        (("10.42.0.10", attacker_mac.as_str()), "10.254.0.1:8181"),
        (("10.42.0.99", attacker_mac.as_str()), "169.254.169.254:80"),
    ];
    for (source, target) in forged {
        assert!(forged_syn_tracked(&e2e, e2e.pod_ns(attacker), source, gateway, target), "{source:?} -> {target}");
    }
    // The node's own address on the bridge, claimed to the victim: its gateway entry is taken.
    let claim_gateway = |e2e: &E2e| {
        let (to, node) = (("10.42.0.10", victim_mac.as_str()), ("10.42.0.1", gateway_mac.as_str()));
        spoof_attack(e2e.pod_ns(attacker), "gateway", to, node, VICTIM_ROLE, "169.254.169.254:80", 0);
        e2e.pod_ns(victim).ok("ip", &["neigh", "show", "10.42.0.1", "dev", "eth0"])
    };
    victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
    let entry = claim_gateway(&e2e);
    assert!(entry.contains(&attacker_mac), "the claim takes the victim's gateway entry: {entry}");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));

    // With it (the default): neither attack gets an answer, the node's neighbour entry for the
    // victim keeps the victim's MAC, and the victim is served its own role throughout.
    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    for (mode, target, tags) in ATTACKS {
        victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
        let got = attack(&e2e, mode, target, tags);
        assert_eq!(got["answered"], false, "{mode} {target}: {got}\n{}", agent.log());
        let neighbour = neighbour_of(e2e.node(), "10.42.0.10");
        assert!(neighbour.contains(&victim_mac), "{mode}: the node's entry still names the victim: {neighbour}");
        let port = forwarding_port(e2e.node(), &victim_mac);
        assert_eq!(port.as_deref(), Some("veth1"), "{mode}: the bridge still sends the victim's frames to its port");
        let (status, document) = pod_request(e2e.pod_ns(victim), VICTIM_ROLE, Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 200, "{mode}: {document}");
        assert!(!access_key(&document).is_empty(), "{document}");
    }
    for (source, target) in forged {
        let tracked = forged_syn_tracked(&e2e, e2e.pod_ns(attacker), source, gateway, target);
        assert!(!tracked, "{source:?} -> {target}: dropped at the first hook");
    }
    e2e.pod_ns(victim).ok("ip", &["neigh", "flush", "dev", "eth0"]);
    victim_speaks(e2e.pod_ns(victim), e2e.node()).await;
    let entry = claim_gateway(&e2e);
    assert!(entry.contains(&gateway_mac), "the victim's gateway entry still names the node: {entry}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn on_a_routed_veth_a_forged_source_is_dropped_before_it_reaches_iamlet() {
    let mut e2e = E2e::new("spoofcali");
    let victim = e2e.add_pod("cali1a2b", Attach::PointToPoint, "10.43.0.10", Some("victim-role"));
    let attacker = e2e.add_pod("cali3c4d", Attach::PointToPoint, "10.43.0.11", Some("attacker-role"));
    // Calico's wiring: the pod's gateway 169.254.1.1 is answered (proxy ARP) by the host veth.
    let gateway_mac = mac_of(e2e.node(), "cali3c4d");
    let attacker_mac = mac_of(e2e.pod_ns(attacker), "eth0");
    // SYNs on the attacker's link: from the victim's address to the metadata address and to
    // the agent's own, and from an address no pod has to the metadata address.
    let forged =
        [("10.43.0.10", "169.254.169.254:80"), ("10.43.0.10", "10.254.0.1:8181"), ("10.43.0.99", "169.254.169.254:80")];
    let tracked = |e2e: &E2e, (source, target): (&str, &str)| {
        let gateway = ("169.254.1.1", gateway_mac.as_str());
        forged_syn_tracked(e2e, e2e.pod_ns(attacker), (source, attacker_mac.as_str()), gateway, target)
    };

    let mut agent = e2e.start_agent(&["--host-interface=cali+", "--bind-pod-ports=false"]).await;
    for syn in forged {
        assert!(tracked(&e2e, syn), "without the binding the forged SYN gets in: {syn:?}");
    }
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));

    let mut agent = e2e.start_agent(&["--host-interface=cali+"]).await;
    for syn in forged {
        assert!(!tracked(&e2e, syn), "dropped at the first hook: {syn:?}\n{}", agent.log());
    }
    iamlet_testkit::eventually(10, "the forged SYN to be counted", async || {
        agent.metric("iamlet_spoofed_packets_total{family=\"ipv4\"}").await.is_some_and(|n| n > 0.0)
    })
    .await;
    let (status, document) = pod_request(e2e.pod_ns(victim), VICTIM_ROLE, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 200, "the victim is served on its own link: {document}");
    let own = "/latest/meta-data/iam/security-credentials/attacker-role";
    let (status, _) = pod_request(e2e.pod_ns(attacker), own, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 200, "the attacker is served as itself");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn an_address_given_to_a_new_pod_on_another_port_is_bound_to_the_new_port_only() {
    let mut e2e = E2e::new("spoofchurn");
    let old = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("old-role"));
    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    let old_path = "/latest/meta-data/iam/security-credentials/old-role";
    assert_eq!(pod_request(e2e.pod_ns(old), old_path, Duration::from_secs(5)).await.unwrap().0, 200);

    // The pod is deleted: the runtime's CNI DEL releases its address and libcni drops its
    // record; its sandbox lingers (a slow teardown), still holding the address.
    let records = std::fs::read_dir(e2e.topology.cni_results.path()).unwrap();
    for record in records.map(|entry| entry.unwrap().path()) {
        if std::fs::read_to_string(&record).unwrap().contains("\"pod-veth1\"") {
            std::fs::remove_file(record).unwrap();
        }
    }
    // The watch misses the deletion (it would correct that at its next re-list).
    e2e.api.delete_pod_unseen("e2e", "pod-veth1");
    // IPAM hands the address to a new pod, on another port. Before the API server knows the
    // new pod, iamlet's index still gives the address to the old one: the CNI's record says
    // otherwise, so the new pod is refused the old pod's role.
    let new = e2e.add_pod_network("veth3", Attach::Bridge, ("10.42.0.10", None));
    iamlet_testkit::eventually(10, "the new port to be bound", async || {
        e2e.our_binding().is_some_and(|b| b.contains("\"veth3\" . "))
    })
    .await;
    let (status, body) = pod_request(e2e.pod_ns(new), old_path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 403, "never the old pod's role: {body}");
    assert!(body.contains("e2e/pod-veth3, not this one"), "{body}");
    e2e.create_pod_object(new, Some("new-role"));
    let new_path = "/latest/meta-data/iam/security-credentials/new-role";
    iamlet_testkit::eventually(10, "the new pod to be served", async || {
        matches!(pod_request(e2e.pod_ns(new), new_path, Duration::from_secs(2)).await, Ok((200, _)))
    })
    .await;
    let binding = e2e.our_binding().unwrap();
    assert!(binding.contains("\"veth3\" . ") && !binding.contains("\"veth1\" . "), "{binding}");
    for path in [old_path, new_path] {
        let answer = pod_request(e2e.pod_ns(old), path, Duration::from_secs(2)).await;
        assert!(answer.is_err(), "the old port gets nothing for {path}: {answer:?}");
    }
    // The old pod, which the watch still shows at the address, is the one refused: counted,
    // and told why on its Events.
    iamlet_testkit::eventually(10, "the stale pod to be reported unbound", async || {
        e2e.api.events().iter().any(|e| e["reason"] == "IAMPodUnbound" && e["regarding"]["name"] == "pod-veth1")
    })
    .await;
    // `iamlet explain` on the node says which port the new pod is bound to.
    let args = e2e.flags(&["--host-interface=cni0"]).args();
    let mut explain = vec!["explain", "e2e/pod-veth3"];
    explain.extend(args.iter().map(String::as_str));
    let report = e2e.node().ok(iamlet_testkit::agent::binary(), &explain);
    assert!(report.contains("10.42.0.10 bound to port veth3 by the CNI's record"), "{report}");
    assert_eq!(agent.metric("iamlet_pods_unbound").await, Some(1.0));
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
}

/// `GET path` from `pod` through IMDS's IPv6 address, `[fd00:ec2::254]:80`.
async fn request_v6(pod: &Netns, path: &'static str) -> Result<(u16, String), String> {
    pod.run(move || async move {
        let imds: std::net::SocketAddr = "[fd00:ec2::254]:80".parse().unwrap();
        iamlet_testkit::pod_client::try_fetch(imds, path, &[], Duration::from_secs(5)).await.map(|r| (r.status, r.body))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn an_ipv6_neighbour_advertisement_claiming_a_pods_address_gets_nothing() {
    let mut e2e = E2e::new("spoof6");
    let victim = e2e.add_dual_stack_pod("veth1", Attach::Bridge, ("10.42.0.10", Some("fd42::10")), Some("victim-role"));
    let attacker =
        e2e.add_dual_stack_pod("veth2", Attach::Bridge, ("10.42.0.11", Some("fd42::11")), Some("attacker-role"));
    let victim_mac = mac_of(e2e.pod_ns(victim), "eth0");
    let attacker_mac = mac_of(e2e.pod_ns(attacker), "eth0");
    let gateway_mac = mac_of(e2e.node(), "cni0");
    let ipv6 = format!("--host-ipv6={}", iamlet_testkit::netns::HOST_IPV6);
    let attack = |e2e: &E2e, tags: usize| {
        let (victim, gateway) = (("fd42::10", victim_mac.as_str()), ("fd42::1", gateway_mac.as_str()));
        spoof_attack(e2e.pod_ns(attacker), "na", victim, gateway, VICTIM_ROLE, "[fd00:ec2::254]:80", tags)
    };
    let neighbour = |e2e: &E2e| e2e.node().ok("ip", &["-6", "neigh", "show", "fd42::10", "dev", "cni0"]);

    let mut agent = e2e.start_agent(&["--host-interface=cni0", &ipv6, "--bind-pod-ports=false"]).await;
    // Plain, then in priority tags (one on the advertisement, two on the TCP frames).
    for tags in [0, 2] {
        e2e.node().ok("ip", &["-6", "neigh", "flush", "dev", "cni0"]);
        let (status, document) = request_v6(e2e.pod_ns(victim), VICTIM_ROLE).await.unwrap();
        assert_eq!(status, 200, "{document}");
        let got = attack(&e2e, tags);
        assert_eq!(got["answered"], true, "{tags} tags: works without the binding: {got}\n{}", agent.log());
        assert_eq!(access_key(got["response"].as_str().unwrap()), access_key(&document), "the victim's credentials");
        let entry = neighbour(&e2e);
        assert!(entry.contains(&attacker_mac), "{tags} tags: the advertisement took the node's entry: {entry}");
    }
    // Blind: a forged source to the agent's own address, an unbound one to the metadata address.
    let gateway = ("fd42::1", gateway_mac.as_str());
    let forged = [
        (("fd42::10", attacker_mac.as_str()), "[fd00:1::1]:8181"),
        (("fd42::99", attacker_mac.as_str()), "[fd00:ec2::254]:80"),
    ];
    for (source, target) in forged {
        assert!(forged_syn_tracked(&e2e, e2e.pod_ns(attacker), source, gateway, target), "{source:?} -> {target}");
    }
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));

    let mut agent = e2e.start_agent(&["--host-interface=cni0", &ipv6]).await;
    for tags in [0, 2] {
        e2e.node().ok("ip", &["-6", "neigh", "flush", "dev", "cni0"]);
        let (status, document) = request_v6(e2e.pod_ns(victim), VICTIM_ROLE).await.unwrap();
        assert_eq!(status, 200, "the victim is served through [fd00:ec2::254]: {document}");
        let got = attack(&e2e, tags);
        assert_eq!(got["answered"], false, "{tags} tags: {got}\n{}", agent.log());
        let entry = neighbour(&e2e);
        assert!(entry.contains(&victim_mac), "{tags} tags: the node's entry still names the victim: {entry}");
    }
    let (status, _) = request_v6(e2e.pod_ns(victim), VICTIM_ROLE).await.unwrap();
    assert_eq!(status, 200);
    for (source, target) in forged {
        let tracked = forged_syn_tracked(&e2e, e2e.pod_ns(attacker), source, gateway, target);
        assert!(!tracked, "{source:?} -> {target}: dropped at the first hook");
    }
    iamlet_testkit::eventually(10, "the advertisements to be counted", async || {
        agent.metric("iamlet_spoofed_packets_total{family=\"ipv6\"}").await.is_some_and(|n| n > 0.0)
    })
    .await;
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
}
