//! End to end, as root, in network namespaces: a "node" namespace running the real `iamlet`
//! binary with real iptables, "pod" namespaces wired like a CNI wires them, and real SDK
//! clients in the pods (botocore, the AWS CLI, aws-config) fetching credentials through
//! 169.254.169.254 and calling STS (moto) with them.
//!
//! These tests are `#[ignore]`d for plain `cargo test` (they need root); scripts/test.sh runs
//! them as root with `--include-ignored`, and fails in CI rather than skip them.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use iamlet_testkit::apiserver::pod;
use iamlet_testkit::e2e::{E2e, aws_cli_in, botocore_in, metadata_answers, pod_request, rust_sdk_in};
use iamlet_testkit::eventually;
use iamlet_testkit::netns::Attach;
use iamlet_testkit::pod_client;
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn bridge_cni_pods_get_their_own_roles_with_real_sdks() {
    let mut e2e = E2e::new("bridge");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let plain = e2e.add_pod("veth2", Attach::Bridge, "10.42.0.11", None);
    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    assert_eq!(e2e.our_rules("v4"), (1, 1), "{}", e2e.node().nat_rules("v4"));

    let sts_url = e2e.sts.url.clone();
    let (code, result) = botocore_in(e2e.pod_ns(app), &sts_url, &[]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());
    assert_eq!(result["method"], "iam-role");
    assert!(result["arn"].as_str().unwrap().ends_with(":assumed-role/e2e-app/e2e.pod-veth1"), "{result}");

    let arn = aws_cli_in(e2e.pod_ns(app), &sts_url).expect("the AWS CLI finds credentials");
    assert!(arn.ends_with(":assumed-role/e2e-app/e2e.pod-veth1"), "{arn}");
    let arn = rust_sdk_in(e2e.pod_ns(app), sts_url.clone()).await.expect("aws-config finds credentials");
    assert!(arn.ends_with(":assumed-role/e2e-app/e2e.pod-veth1"), "{arn}");

    // An IMDSv1 client (no token), as older SDKs and curl scripts are.
    let v1 = e2e
        .pod_ns(app)
        .run(|| async {
            let imds: SocketAddr = "169.254.169.254:80".parse().unwrap();
            pod_client::fetch(imds, "/latest/meta-data/iam/security-credentials/e2e-app", &[], Duration::from_secs(2))
                .await
        })
        .await
        .expect("answered");
    assert_eq!(v1.status, 200);
    assert_eq!(v1.json()["Code"], "Success");

    // The pod without a role gets none, and never the node's.
    let (code, result) = botocore_in(e2e.pod_ns(plain), &sts_url, &[]);
    assert_eq!(code, 3, "{result}");
    assert!(aws_cli_in(e2e.pod_ns(plain), &sts_url).is_err());

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0), "{}", agent.log());
    assert_eq!(e2e.our_rules("v4"), (0, 0), "rules removed on exit: {}", e2e.node().nat_rules("v4"));
    assert!(!e2e.node().nat_rules("v4").contains(":IAMLET"), "the chain is gone too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn calico_interfaces_wildcards_and_negations_match_what_they_should() {
    let mut e2e = E2e::new("calico");
    let cali1 = e2e.add_pod("cali1a2b", Attach::PointToPoint, "10.43.0.10", Some("e2e-app"));
    let cali2 = e2e.add_pod("cali3c4d", Attach::PointToPoint, "10.43.0.11", Some("e2e-app"));
    let other = e2e.add_pod("ext0", Attach::PointToPoint, "10.43.0.12", Some("e2e-app"));
    let sts_url = e2e.sts.url.clone();

    for pattern in ["--host-interface=cali+", "--host-interface=!ext0", "--host-interface=auto"] {
        let mut agent = e2e.start_agent(&[pattern]).await;
        let (code, result) = botocore_in(e2e.pod_ns(cali1), &sts_url, &[]);
        assert_eq!(code, 0, "{pattern}: {result}\n{}", agent.log());
        assert!(metadata_answers(e2e.pod_ns(cali2)).await, "{pattern}: the second cali pod");
        // Traffic on ext0 is not intercepted: it reaches the node's own metadata service,
        // and the coverage check says so.
        let leaked =
            pod_request(e2e.pod_ns(other), "/latest/meta-data/iam/security-credentials/", Duration::from_secs(2));
        assert_eq!(leaked.await, Ok((200, "node-role".to_string())), "{pattern}: ext0 is not behind the match");
        iamlet_testkit::eventually(20, "the uncovered pod to be counted", async || {
            agent.metric("iamlet_pods_not_intercepted").await == Some(1.0)
        })
        .await;
        let log = agent.log();
        assert!(
            log.contains("pod is not intercepted") && log.contains("e2e/pod-ext0") && log.contains("ext0"),
            "{log}"
        );
        if pattern == "--host-interface=auto" {
            assert!(log.contains("Calico"), "auto names the CNI it found: {log}");
        }
        agent.signal(Signal::SIGTERM);
        assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn rules_are_installed_once_repaired_when_changed_and_removed_on_exit_or_cleanup() {
    let host_before = (host_nat_rules(), host_nat_rules_v6());
    let mut e2e = E2e::new("lifecycle");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let node = e2e.node();

    // A crash (kill -9) leaves the rules, and the pod port binding; each restart still leaves
    // exactly one set.
    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    let binding = e2e.our_binding().expect("the pod port binding is installed");
    assert!(binding.contains("\"veth1\" . ") && binding.contains(". 10.42.0.10"), "{binding}");
    for restart in 1..=2 {
        agent.signal(Signal::SIGKILL);
        agent.exit(Duration::from_secs(10)).await;
        assert_eq!(e2e.our_rules("v4"), (1, 1), "a killed agent cannot clean up");
        assert_eq!(e2e.our_binding().as_ref(), Some(&binding), "nor its binding");
        agent = e2e.start_agent(&["--host-interface=cni0"]).await;
        assert_eq!(e2e.our_rules("v4"), (1, 1), "restart {restart} leaves one set: {}", node.nat_rules("v4"));
    }

    // Someone flushes the chain, then deletes the jump: repaired within the sync period.
    node.ok("iptables-nft", &["-w", "-t", "nat", "-F", "IAMLET"]);
    wait_for_rules(&e2e, (1, 1)).await;
    let jump = node.nat_rules("v4").lines().find(|l| l.ends_with("-j IAMLET")).unwrap().replacen("-A", "-D", 1);
    let jump_args: Vec<&str> = jump.split_whitespace().collect();
    node.ok("iptables-nft", &[&["-w", "-t", "nat"][..], &jump_args].concat());
    wait_for_rules(&e2e, (1, 1)).await;
    assert!(metadata_answers(e2e.pod_ns(app)).await, "the repaired rules work");
    // Someone empties the binding's set, then deletes its table: repaired too.
    node.ok("nft", &["flush", "set", "bridge", "iamlet", "bound4"]);
    iamlet_testkit::eventually(10, "the binding's set to be refilled", async || {
        e2e.our_binding().is_some_and(|b| b.contains(". 10.42.0.10"))
    })
    .await;
    node.ok("nft", &["delete", "table", "bridge", "iamlet"]);
    iamlet_testkit::eventually(10, "the binding's table to be reinstalled", async || {
        e2e.our_binding().is_some_and(|b| b.contains(". 10.42.0.10"))
    })
    .await;
    assert!(metadata_answers(e2e.pod_ns(app)).await, "the repaired binding lets the pod through");
    // Each repair is counted once it is done, which may be just after the repaired rules show.
    iamlet_testkit::eventually(10, "two repairs of the rules and two of the binding to be counted", async || {
        agent.metric("iamlet_iptables_repairs_total").await.is_some_and(|n| n >= 4.0)
    })
    .await;

    // kill -9, then `iamlet cleanup` removes the leftovers.
    agent.signal(Signal::SIGKILL);
    agent.exit(Duration::from_secs(10)).await;
    let report = node.ok(iamlet_testkit::agent::binary(), &["cleanup"]);
    assert!(report.contains("iptables-nft (IPv4): removed iamlet's rules"), "{report}");
    assert!(report.contains("removed iamlet's pod port binding"), "{report}");
    assert_eq!(e2e.our_rules("v4"), (0, 0));
    assert_eq!(e2e.our_binding(), None);
    let again = node.ok(iamlet_testkit::agent::binary(), &["cleanup"]);
    assert!(again.contains("nothing to remove"), "cleanup is idempotent: {again}");

    // --iptables-keep-on-exit keeps them through a clean exit (fail closed).
    let mut agent = e2e.start_agent(&["--host-interface=cni0", "--iptables-keep-on-exit"]).await;
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));
    assert_eq!(e2e.our_rules("v4"), (1, 1), "kept on exit");
    assert!(e2e.our_binding().is_some(), "the binding too");
    assert!(!metadata_answers(e2e.pod_ns(app)).await, "pods fail closed while the agent is away");
    node.ok(iamlet_testkit::agent::binary(), &["cleanup"]);
    assert_eq!(e2e.our_rules("v4"), (0, 0));
    assert_eq!(e2e.our_binding(), None);

    assert_eq!((host_nat_rules(), host_nat_rules_v6()), host_before, "the host's own tables are never touched");
}

async fn wait_for_rules(e2e: &E2e, expected: (usize, usize)) {
    for _ in 0..100 {
        if e2e.our_rules("v4") == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rules not repaired: {}", e2e.node().nat_rules("v4"));
}

fn host_nat_rules() -> String {
    String::from_utf8_lossy(&Command::new("iptables-nft").args(["-w", "-t", "nat", "-S"]).output().unwrap().stdout)
        .into_owned()
}

fn host_nat_rules_v6() -> String {
    String::from_utf8_lossy(&Command::new("ip6tables-nft").args(["-w", "-t", "nat", "-S"]).output().unwrap().stdout)
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn ipv6_pods_reach_the_agent_through_fd00_ec2_254() {
    let mut e2e = E2e::new("ipv6");
    e2e.topology.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("fd42::10"));
    e2e.api.create_pod(pod("e2e", "dual").ips(&["10.42.0.10", "fd42::10"]).role("e2e-v6").build());
    let mut agent =
        e2e.start_agent(&["--host-interface=cni0", &format!("--host-ipv6={}", iamlet_testkit::netns::HOST_IPV6)]).await;
    assert_eq!(e2e.our_rules("v6"), (1, 1), "{}", e2e.node().nat_rules("v6"));
    assert_eq!(e2e.our_backstop("v6"), (1, 1), "the backstop covers [fd00:ec2::254] too");

    let sts_url = e2e.sts.url.clone();
    let (code, result) = botocore_in(e2e.pod_ns(0), &sts_url, &[("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());
    assert!(result["arn"].as_str().unwrap().ends_with(":assumed-role/e2e-v6/e2e.dual"), "{result}");
    // This "runtime" leaves no CNI record (the pod was wired by hand): `auto` gives the
    // binding up once it sees the node's pods, and says so, rather than refuse them all.
    let log = agent.log();
    assert!(log.contains("pod ports are not bound: none of this node's 1 pods has a record"), "{log}");
    assert_eq!(e2e.our_binding(), None);

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));
    assert_eq!((e2e.our_rules("v6"), e2e.our_backstop("v6")), ((0, 0), (0, 0)));
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((0, 0), (0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn the_backend_kube_proxy_uses_is_chosen_and_can_be_forced() {
    let mut e2e = E2e::new("backend");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let node = e2e.node();
    // "kube-proxy" on the legacy backend.
    node.ok("iptables-legacy", &["-w", "-t", "nat", "-N", "KUBE-SERVICES"]);
    node.ok("iptables-legacy", &["-w", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);

    let mut agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    let legacy = String::from_utf8_lossy(&node.exec("iptables-legacy", &["-w", "-t", "nat", "-S"]).stdout).into_owned();
    assert!(legacy.contains("-j IAMLET"), "auto follows kube-proxy to legacy: {legacy}");
    let first = legacy.lines().find(|l| l.starts_with("-A PREROUTING")).unwrap();
    assert!(first.ends_with("-j IAMLET"), "inserted ahead of kube-proxy's rules: {legacy}");
    assert!(metadata_answers(e2e.pod_ns(app)).await);
    agent.signal(Signal::SIGTERM);
    agent.exit(Duration::from_secs(20)).await;

    let mut agent = e2e.start_agent(&["--host-interface=cni0", "--iptables-backend=nft"]).await;
    let nft = String::from_utf8_lossy(&node.exec("iptables-nft", &["-w", "-t", "nat", "-S"]).stdout).into_owned();
    assert!(nft.contains("-j IAMLET"), "forced to nft: {nft}");
    agent.signal(Signal::SIGTERM);
    agent.exit(Duration::from_secs(20)).await;
    assert_eq!(e2e.our_rules("v4"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_named_interface_that_is_absent_keeps_the_node_tainted_and_missing_capabilities_a_clear_error() {
    let mut e2e = E2e::new("badiface");
    e2e.api.put_node("node-a", json!({}), json!([{"key": "iamlet.io/agent-not-ready", "effect": "NoSchedule"}]));
    // Pods on flannel's cni0, and --host-interface naming Weave's link, which this node lacks.
    let pod = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let mut agent = e2e.agent(&["--host-interface=weave"]).spawn();
    eventually(20, "the agent to say what it waits for", async || agent.log().contains("no link matches weave")).await;
    let log = agent.log();
    let warning = log.lines().find(|l| l.contains("no link matches weave")).unwrap();
    assert!(
        warning.contains("cni0") && warning.contains("Calico: cali+") && warning.contains("not ready"),
        "{warning}"
    );
    let readyz = agent.admin_get("/readyz").await.expect("the admin port answers");
    assert_eq!(readyz.status, 503, "not ready while pods may sit elsewhere: {}", readyz.body);
    assert_eq!(e2e.our_rules("v4"), (0, 0), "nothing installed for a link that is not there");
    assert_eq!(e2e.taint_keys(), ["iamlet.io/agent-not-ready"], "the node stays unprotected, so tainted");
    assert_eq!(log.matches("no link matches weave").count(), 1, "said once: {log}");

    // Weave's link appears: the agent installs its rules, becomes ready and lifts the taint.
    e2e.node().ip("link add weave type bridge");
    e2e.node().ip("link set weave up");
    agent.wait_ready().await;
    assert_eq!(e2e.our_rules("v4"), (1, 1));
    assert!(e2e.node().nat_rules("v4").contains("-i weave"), "{}", e2e.node().nat_rules("v4"));
    eventually(20, "the startup taint to be removed", async || e2e.taint_keys().is_empty()).await;
    // The pod on cni0 is still not covered: that is the coverage check's alarm, with an Event.
    eventually(20, "the pod on cni0 to be counted", async || {
        agent.metric("iamlet_pods_not_intercepted").await == Some(1.0)
    })
    .await;
    let _ = pod;
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(20)).await.code(), Some(0));

    // Without the capabilities (an unprivileged user), the error says which ones.
    let output = e2e.node().exec(
        "setpriv",
        &[
            &["--reuid=65534", "--regid=65534", "--clear-groups", iamlet_testkit::agent::binary()][..],
            &e2e.flags(&["--host-interface=cni0", "--app-port=18181", "--metrics-port=18182"])
                .args()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("NET_ADMIN"), "{stderr}");
}
