//! A DaemonSet's surge update end to end, as root in network namespaces with real iptables
//! (and, under scripts/test.sh, the image's containers): the successor starts beside the
//! agent, takes over its sockets, cached credentials and rules, and a pod asking through
//! 169.254.169.254 all along notices nothing; the rules are one set, never repaired by either
//! agent against the other, kept when the predecessor exits, and removed by the uninstall.
//!
//! `#[ignore]`d for plain `cargo test` (it needs root); scripts/test.sh runs it as root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_config::imds::Client as ImdsClient;
use iamlet_testkit::e2e::{AGENT_NAMESPACE, AGENT_POD, BotocoreLoop, E2e};
use iamlet_testkit::netns::{Attach, METADATA_IP};
use iamlet_testkit::{eventually, pod_client};
use nix::sys::signal::Signal;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/e2e-app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: scripts/test.sh runs it as root"]
async fn a_surge_update_is_invisible_to_a_pod_and_an_uninstall_still_removes_everything() {
    let mut e2e = E2e::new("surge");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    e2e.install_daemonset();
    let mut agent = e2e.start_daemonset_agent(&["--host-interface=cni0"]).await;
    let binding = e2e.our_binding().expect("the pod port binding");
    // Cached, not just asked for: a call STS has not answered yet is not handed over.
    let fetched = "iamlet_sts_assume_role_calls_total{result=\"success\"}";
    eventually(30, "the pod's credentials prefetched", async || agent.metric(fetched).await.is_some_and(|n| n >= 1.0))
        .await;
    let calls_before = e2e.sts.assume_role_calls().len();

    // In the pod, until told to stop: a new connection every few milliseconds with an IMDSv2
    // token taken before the updates, and aws-config's IMDS client, one object with the token
    // it keeps (6 hours), one attempt per call; and botocore's fetcher in a loop. Every
    // refusal and error answer is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_file = e2e.state.path().join("stop-asking");
    let endpoint = format!("http://{METADATA_IP}/");
    let botocore = BotocoreLoop::start(Some(e2e.pod_ns(app)), &endpoint, &stop_file);
    let asking = {
        let stop = stop.clone();
        e2e.pod_ns(app).run(move || async move {
            let imds: SocketAddr = format!("{METADATA_IP}:80").parse().unwrap();
            let ttl = [("x-aws-ec2-metadata-token-ttl-seconds", "21600")];
            let mut connection = pod_client::Connection::open(None, imds).await.unwrap();
            let token = pod_client::Reply::from(connection.send("PUT", "/latest/api/token", &ttl).await.unwrap()).body;
            let sdk = ImdsClient::builder().max_attempts(1).build();
            let (mut served, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let header = [("x-aws-ec2-metadata-token", token.as_str())];
                match pod_client::try_fetch(imds, CREDS, &header, Duration::from_secs(2)).await {
                    Ok(reply) if reply.status == 200 => served += 1,
                    Ok(reply) => failures.push(format!("{} {}", reply.status, reply.body.trim())),
                    Err(error) => failures.push(error),
                }
                match sdk.get(CREDS).await {
                    Ok(_) => served += 1,
                    Err(error) => failures.push(format!("aws-config: {error:?}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (served, failures)
        })
    };
    let updates = async {
        let mut name = AGENT_POD.to_string();
        for update in 1..=5 {
            // The DaemonSet controller creates the surge pod, then deletes the old one once
            // the new one is ready.
            let successor_name = format!("iamlet-surge-{update}");
            e2e.add_agent_pod(&successor_name);
            let successor = e2e.agent(&["--host-interface=cni0"]);
            let successor = successor.env("POD_NAMESPACE", AGENT_NAMESPACE).env("POD_NAME", &successor_name).spawn();
            eventually(60, "the successor to take over", async || {
                successor.log().contains("took over from the predecessor")
            })
            .await;
            let log = agent.terminate().await;
            e2e.api.delete_pod(AGENT_NAMESPACE, &std::mem::replace(&mut name, successor_name));
            assert!(log.contains("keeping iamlet's rules: the successor keeps them now"), "update {update}: {log}");
            assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((1, 1), (1, 1)), "update {update}: one set");
            assert_eq!(e2e.our_binding().as_ref(), Some(&binding), "update {update}: the binding as it was");
            agent = successor;
        }
        stop.store(true, Ordering::Relaxed);
        agent
    };
    let ((served, failures), mut agent) = tokio::join!(asking, updates);
    let botocore = botocore.finish(&stop_file).await;
    assert!(failures.is_empty(), "the pod noticed: {failures:?} ({served} answered)");
    assert_eq!(botocore["failures"], serde_json::json!([]), "botocore: {botocore}");
    assert!(botocore["served"].as_u64().unwrap() > 10, "{botocore}");
    assert!(served > 20, "the pod asked throughout ({served})");
    let calls = e2e.sts.assume_role_calls();
    assert_eq!(calls.len(), calls_before, "no AssumeRole for the updates: {calls:?}\n{}", agent.log());
    let repairs = agent.metric("iamlet_iptables_repairs_total").await.unwrap_or(0.0);
    assert_eq!(repairs, 0.0, "no repair undid the other agent's rules:\n{}", agent.log());

    // The uninstall: the DaemonSet deleted, its pod stopped. Nothing is left.
    e2e.api.delete_daemonset(AGENT_NAMESPACE, "iamlet");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.exit(Duration::from_secs(30)).await.code(), Some(0), "{}", agent.log());
    assert_eq!((e2e.our_rules("v4"), e2e.our_backstop("v4")), ((0, 0), (0, 0)), "{}", agent.log());
    assert_eq!(e2e.our_binding(), None);
}
