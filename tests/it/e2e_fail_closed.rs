//! The node fails closed, end to end, as root in network namespaces: the node's real metadata
//! service sits on the EC2 host behind the node's uplink and answers IMDSv1 (the worst case),
//! so any pod request that is not intercepted *would* get the node's secrets. Each test
//! makes one of the moments where that used to happen, and checks that the pod is refused
//! instead: a restart, lost rules, a connection from before the rules, a node whose CNI is
//! not there yet.
//!
//! `#[ignore]`d for plain `cargo test` (they need root); scripts/test.sh runs them as root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use iamlet_testkit::e2e::{E2e, assert_no_node_secret, botocore_in, pod_request};
use iamlet_testkit::eventually;
use iamlet_testkit::netns::Attach;
use nix::sys::signal::Signal;
use serde_json::json;

const NODE_CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/node-role";

/// A pod's request must be refused outright (connection refused or reset), never answered.
async fn assert_refused(e2e: &E2e, pod: usize, why: &str) {
    for path in ["/latest/meta-data/iam/security-credentials/", NODE_CREDENTIALS, "/latest/user-data"] {
        let got = pod_request(e2e.pod_ns(pod), path, Duration::from_secs(3)).await;
        if let Ok((_, body)) = &got {
            assert_no_node_secret(body);
        }
        assert!(
            matches!(&got, Err(e) if e.contains("refused") || e.contains("reset")),
            "{why}: {path} must be refused, got {got:?}"
        );
    }
}

fn iamlet_chains_anywhere(e2e: &E2e) -> bool {
    ["nat", "filter"].iter().any(|table| e2e.node().table_rules("v4", table).contains("IAMLET"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_restart_keeps_the_rules_and_refuses_pods_an_uninstall_removes_everything() {
    let mut e2e = E2e::new("replace");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    e2e.install_daemonset();
    let sts_url = e2e.sts.url.clone();
    let mut agent = e2e.start_daemonset_agent(&["--host-interface=cni0"]).await;
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)));
    let (code, result) = botocore_in(e2e.pod_ns(app), &sts_url, &[]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());

    // A rolling update: SIGTERM while the DaemonSet still runs here. The rules stay, and
    // until the successor is up the pod is refused, never answered by the node's IMDS.
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
    assert!(
        agent.log().contains("keeping iamlet's rules: DaemonSet kube-system/iamlet still runs on this node"),
        "{}",
        agent.log()
    );
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)), "kept while replaced");
    assert!(e2e.our_binding().is_some(), "the pod port binding too");
    assert_refused(&e2e, app, "between the agent and its successor").await;

    // The successor finds the rules in place and leaves exactly one set.
    let mut successor = e2e.start_daemonset_agent(&["--host-interface=cni0"]).await;
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)), "{}", e2e.node().nat_rules("v4"));
    let (code, result) = botocore_in(e2e.pod_ns(app), &sts_url, &[]);
    assert_eq!(code, 0, "{result}\n{}", successor.log());

    // An uninstall: the DaemonSet is deleted, then its pod gets SIGTERM. Nothing is left.
    e2e.api.delete_daemonset("kube-system", "iamlet");
    successor.signal(Signal::SIGTERM);
    assert_eq!(successor.exit(Duration::from_secs(20)).await.code(), Some(0));
    assert!(
        successor.log().contains("removing iamlet's rules: DaemonSet kube-system/iamlet is gone"),
        "{}",
        successor.log()
    );
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((0, 0), (0, 0)));
    assert!(!iamlet_chains_anywhere(&e2e), "no chain left in nat or filter");
    assert_eq!(e2e.our_binding(), None, "nor the pod port binding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn an_unreachable_api_server_at_shutdown_keeps_the_rules() {
    let mut e2e = E2e::new("noapi");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    e2e.install_daemonset();
    let mut agent = e2e.start_daemonset_agent(&["--host-interface=cni0"]).await;
    e2e.api.set_outage(true);
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(30)).await.code(), Some(0), "{}", agent.log());
    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("cannot tell a restart from an uninstall")).collect();
    assert_eq!(lines.len(), 1, "said in one line: {log}");
    assert!(lines[0].contains("iamlet cleanup"), "{}", lines[0]);
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)), "fail closed");
    assert_refused(&e2e, app, "after an exit that could not ask the API server").await;
    e2e.node().ok(iamlet_testkit::agent::binary(), &["cleanup"]);
    assert!(!iamlet_chains_anywhere(&e2e), "cleanup removes the backstop too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn flushed_nat_rules_refuse_pods_until_repaired_and_never_leak() {
    let mut e2e = E2e::new("flush");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let sts_url = e2e.sts.url.clone();
    let agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    let repairs_before = agent.metric("iamlet_iptables_repairs_total").await;

    // Freeze the agent so the gap lasts, then lose the whole nat PREROUTING chain.
    agent.signal(Signal::SIGSTOP);
    e2e.node().ok("iptables-nft", &["-w", "-t", "nat", "-F", "PREROUTING"]);
    assert_eq!(e2e.our_rules("v4").0, 0);
    assert_refused(&e2e, app, "while the nat rules are gone").await;

    agent.signal(Signal::SIGCONT);
    eventually(20, "the rules to be repaired", async || {
        agent.metric("iamlet_iptables_repairs_total").await > repairs_before
    })
    .await;
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)));
    let (code, result) = botocore_in(e2e.pod_ns(app), &sts_url, &[]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());
}

/// Sends `GET path` on an open keep-alive connection and reads one response: its text, or
/// how the connection failed.
fn http_on(stream: &mut TcpStream, path: &str) -> Result<String, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: keep-alive\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(head + &String::from_utf8_lossy(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_connection_opened_before_the_rules_cannot_reach_the_node_imds_afterwards() {
    let mut e2e = E2e::new("conntrack");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    // As on every node, kube-proxy's nat rules are there first, so conntrack tracks flows.
    e2e.node().ok("iptables-nft", &["-w", "-t", "nat", "-N", "KUBE-SERVICES"]);
    e2e.node().ok("iptables-nft", &["-w", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);

    // Before iamlet: the pod opens a keep-alive connection, answered by the node's IMDS.
    let mut stream = e2e
        .pod_ns(app)
        .run(|| async { TcpStream::connect("169.254.169.254:80") })
        .await
        .expect("the node's IMDS is reachable before iamlet");
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let before = http_on(&mut stream, "/latest/meta-data/instance-type").unwrap();
    assert!(before.contains("m5.large"), "{before}");

    // A second pod flow to the node's IMDS, as conntrack holds it: checked by its own tuple,
    // so nothing but iamlet can account for its removal.
    let flow = ["-p", "tcp", "-s", "10.42.0.99", "-d", "169.254.169.254", "--sport", "41999", "--dport", "80"];
    let reply = ["-r", "169.254.169.254", "-q", "10.254.0.1", "--reply-port-src", "80", "--reply-port-dst", "41999"];
    let state = ["--state", "ESTABLISHED", "--timeout", "3600", "-u", "ASSURED,SEEN_REPLY"];
    e2e.node().ok("conntrack", &[&["-I"][..], &flow, &reply, &state].concat());
    let listed = |e2e: &E2e| e2e.node().exec("conntrack", &[&["-L"][..], &flow].concat());
    assert!(String::from_utf8_lossy(&listed(&e2e).stdout).contains("sport=41999"), "the flow is tracked");

    let agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    // Ready means installed, and connections that bypass iamlet forgotten.
    let flows = String::from_utf8_lossy(&listed(&e2e).stdout).into_owned();
    assert!(
        !flows.contains("sport=41999"),
        "a connection to the node's IMDS left in conntrack:\n{flows}\n{}",
        agent.log()
    );

    // The same connection now asks for the node's credentials: it is cut, not answered.
    let after = http_on(&mut stream, NODE_CREDENTIALS);
    if let Ok(text) = &after {
        assert_no_node_secret(text);
    }
    assert!(after.is_err(), "the old connection must not be answered: {after:?}");
    // A new connection reaches iamlet.
    let (code, result) = botocore_in(e2e.pod_ns(app), &e2e.sts.url, &[]);
    assert_eq!(code, 0, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn auto_waits_for_the_cni_and_the_startup_taint_stays_until_the_node_is_protected() {
    let mut e2e = E2e::new("autowait");
    // A new node: no CNI configuration and no CNI link yet, only the AMI's docker0.
    e2e.node().ip("link del cni0");
    e2e.node().ip("link add docker0 type bridge");
    e2e.node().ip("link set docker0 up");
    e2e.api.put_node(
        "node-a",
        json!({}),
        json!([{"key": "iamlet.io/agent-not-ready", "effect": "NoSchedule"},
               {"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]),
    );
    let mut agent = e2e.agent(&[]).spawn();
    eventually(20, "the agent to say what it waits for", async || agent.log().contains("waiting for the CNI")).await;
    assert!(agent.log().contains("no CNI configuration in"), "{}", agent.log());
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((0, 0), (0, 0)), "docker0 is never picked");
    assert!(e2e.taint_keys().contains(&"iamlet.io/agent-not-ready".to_string()), "the node is not protected yet");

    // The CNI arrives: its configuration, then the first pod behind a cali link.
    std::fs::write(
        e2e.cni_conf.path().join("10-calico.conflist"),
        json!({"name": "k8s-pod-network", "cniVersion": "0.3.1", "plugins": [{"type": "calico"}, {"type": "portmap"}]})
            .to_string(),
    )
    .unwrap();
    let app = e2e.add_pod("cali1a2b", Attach::PointToPoint, "10.43.0.10", Some("e2e-app"));
    agent.wait_ready().await;
    assert!(agent.log().contains("cni=\"Calico\""), "{}", agent.log());
    assert!(e2e.node().nat_rules("v4").contains("-i cali+"), "{}", e2e.node().nat_rules("v4"));
    eventually(20, "the startup taint to be removed", async || e2e.taint_keys() == ["dedicated"]).await;
    let (code, result) = botocore_in(e2e.pod_ns(app), &e2e.sts.url, &[]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn auto_reads_the_aws_vpc_cni_configuration_and_intercepts_eni_and_vlan_pods() {
    let mut e2e = E2e::new("awscni");
    e2e.node().ip("link add docker0 type bridge");
    std::fs::write(
        e2e.cni_conf.path().join("10-aws.conflist"),
        json!({"name": "aws-cni", "plugins": [{"type": "aws-cni"}, {"type": "egress-cni"}, {"type": "portmap"}]})
            .to_string(),
    )
    .unwrap();
    let eni = e2e.add_pod("eni3f2a1b7c", Attach::PointToPoint, "10.44.0.10", Some("e2e-app"));
    // Security groups for pods: a branch ENI behind a vlan link.
    let vlan = e2e.add_pod("vlan8d2c4e1", Attach::PointToPoint, "10.44.0.11", Some("e2e-sgp"));
    let agent = e2e.start_agent(&[]).await;
    assert!(agent.log().contains("cni=\"AWS VPC CNI\""), "{}", agent.log());
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((2, 1), (2, 1)), "{}", e2e.node().nat_rules("v4"));
    for (pod, role) in [(eni, "e2e-app"), (vlan, "e2e-sgp")] {
        let (code, result) = botocore_in(e2e.pod_ns(pod), &e2e.sts.url, &[]);
        assert_eq!(code, 0, "{result}\n{}", agent.log());
        assert!(result["arn"].as_str().unwrap().contains(&format!(":assumed-role/{role}/")), "{result}");
    }
    assert_eq!(agent.metric("iamlet_pods_not_intercepted").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_calico_configuration_wins_over_bridges_and_a_pod_elsewhere_is_an_alarm() {
    let mut e2e = E2e::new("calicoconf");
    e2e.node().ip("link add docker0 type bridge");
    std::fs::write(
        e2e.cni_conf.path().join("10-calico.conflist"),
        json!({"plugins": [{"type": "calico"}]}).to_string(),
    )
    .unwrap();
    let cali = e2e.add_pod("cali9e8d", Attach::PointToPoint, "10.43.0.10", Some("e2e-app"));
    // A pod on the cni0 bridge, which the Calico match does not cover.
    let stray = e2e.add_pod("veth7", Attach::Bridge, "10.42.0.17", Some("e2e-app"));
    let agent = e2e.start_agent(&[]).await;
    let nat = e2e.node().nat_rules("v4");
    assert!(nat.contains("-i cali+") && !nat.contains("-i cni0") && !nat.contains("docker0"), "{nat}");
    let (code, result) = botocore_in(e2e.pod_ns(cali), &e2e.sts.url, &[]);
    assert_eq!(code, 0, "{result}");

    eventually(20, "the uncovered pod to be counted", async || {
        agent.metric("iamlet_pods_not_intercepted").await == Some(1.0)
    })
    .await;
    let log = agent.log();
    let warning = log.lines().find(|l| l.contains("pod is not intercepted")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("e2e/pod-veth7") && warning.contains("cni0") && warning.contains("cali+"), "{warning}");
    let _ = stray;
    // `kubectl describe pod` shows it too: a Warning Event on the pod, without --pod-events.
    eventually(20, "an IAMNotIntercepted event on the pod", async || {
        e2e.api.events().iter().any(|e| e["reason"] == "IAMNotIntercepted" && e["regarding"]["name"] == "pod-veth7")
    })
    .await;
    let event = e2e.api.events().into_iter().find(|e| e["reason"] == "IAMNotIntercepted").unwrap();
    assert_eq!(event["type"], "Warning", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("cni0") && note.contains("--host-interface=cali+"), "{note}");
    assert!(!e2e.api.events().iter().any(|e| e["regarding"]["name"] == "pod-cali9e8d"), "the covered pod has none");

    // `iamlet explain`, run on the node, says the same.
    let explain = e2e.node().exec(
        iamlet_testkit::agent::binary(),
        &[
            "explain",
            "e2e/pod-veth7",
            "--node=node-a",
            &format!("--api-server={}", e2e.api.url),
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            &format!("--cni-conf-dir={}", e2e.cni_conf.path().display()),
        ],
    );
    let report = String::from_utf8_lossy(&explain.stdout);
    let words = report.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words.contains("interface: 10.42.0.17 via cni0: NOT covered by --host-interface cali+"),
        "{report}{}",
        String::from_utf8_lossy(&explain.stderr)
    );
}
