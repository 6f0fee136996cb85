//! What protects a node beyond the DNAT itself, against the fake API server and without
//! root: whether a successor will come (which decides if the rules outlive the agent), the
//! startup taint, and the warning about a node whose metadata service answers IMDSv1.

use iamlet::cluster::placement::{self, Controller, SelfPod};
use iamlet::netfilter::lifecycle::Placement;
use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::eventually;
use iamlet_testkit::imds::{FakeImds, Tokens};
use iamlet_testkit::node::TestNode;
use serde_json::json;

const NS: &str = "kube-system";

fn agent_pod() -> SelfPod {
    SelfPod { namespace: NS.into(), name: "iamlet-abcde".into() }
}

async fn client(api: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(api.url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// A cluster where the DaemonSet `iamlet` runs the agent's pod on node-a.
async fn cluster(template: serde_json::Value) -> (FakeApiServer, kube::Client) {
    let api = FakeApiServer::start().await;
    api.put_node("node-a", json!({"kubernetes.io/os": "linux"}), json!([]));
    api.put_daemonset(NS, "iamlet", template);
    api.create_pod(pod(NS, "iamlet-abcde").host_network().owned_by_daemonset("iamlet").build());
    let client = client(&api).await;
    (api, client)
}

fn every_node() -> serde_json::Value {
    json!({"hostNetwork": true, "tolerations": [{"operator": "Exists"}], "containers": [{"name": "iamlet"}]})
}

async fn ask(client: &kube::Client) -> Placement {
    placement::placement(client, Some(&agent_pod()), None, "node-a").await
}

#[tokio::test]
async fn a_daemonset_that_still_runs_here_means_a_restart() {
    let (_api, client) = cluster(every_node()).await;
    assert_eq!(
        placement::controller(&client, &agent_pod()).await.unwrap(),
        Controller::DaemonSet { namespace: NS.into(), name: "iamlet".into() }
    );
    assert_eq!(ask(&client).await, Placement::Replaced { daemonset: "kube-system/iamlet".into() });
}

#[tokio::test]
async fn a_deleted_or_deleting_daemonset_means_an_uninstall() {
    let (api, client) = cluster(every_node()).await;
    api.update_daemonset(NS, "iamlet", |ds| {
        ds["metadata"]["deletionTimestamp"] = json!("2026-11-22T10:00:00Z");
        ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    });
    assert!(matches!(ask(&client).await, Placement::Removed { reason } if reason.contains("being deleted")));
    // The owner was read while the pod existed; the DaemonSet is then deleted with it.
    let known = placement::controller(&client, &agent_pod()).await.unwrap();
    api.delete_daemonset(NS, "iamlet");
    api.delete_pod(NS, "iamlet-abcde");
    let placement = placement::placement(&client, Some(&agent_pod()), Some(known), "node-a").await;
    assert!(matches!(&placement, Placement::Removed { reason } if reason.contains("is gone")), "{placement:?}");
}

#[tokio::test]
async fn a_daemonset_that_no_longer_selects_the_node_means_an_uninstall_here() {
    // The canary overlay's DaemonSet, after the node's canary label was removed.
    let canary = json!({"hostNetwork": true, "nodeSelector": {"iamlet.io/canary": "true"},
                        "tolerations": [{"operator": "Exists"}], "containers": [{"name": "iamlet"}]});
    let (api, client) = cluster(canary).await;
    let placement = ask(&client).await;
    assert!(
        matches!(&placement, Placement::Removed { reason } if reason.contains("iamlet.io/canary=true")),
        "{placement:?}"
    );
    api.put_node("node-a", json!({"iamlet.io/canary": "true"}), json!([]));
    assert!(matches!(ask(&client).await, Placement::Replaced { .. }));
}

#[tokio::test]
async fn an_agent_not_run_by_a_daemonset_removes_its_rules() {
    let api = FakeApiServer::start().await;
    api.create_pod(pod(NS, "iamlet-abcde").host_network().build());
    let client = client(&api).await;
    assert!(matches!(ask(&client).await, Placement::Removed { reason } if reason.contains("no controller")));
    let outside = placement::placement(&client, None, None, "node-a").await;
    assert!(matches!(outside, Placement::Removed { reason } if reason.contains("POD_NAME")));
}

#[tokio::test]
async fn an_unreachable_api_server_means_unknown_so_the_rules_stay() {
    let (api, client) = cluster(every_node()).await;
    api.set_outage(true);
    let placement = ask(&client).await;
    assert!(matches!(&placement, Placement::Unknown { .. }), "{placement:?}");
    let gone = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    assert!(matches!(ask(&gone).await, Placement::Unknown { .. }));
}

#[tokio::test]
async fn the_startup_taint_is_removed_once_ready_and_other_taints_are_kept() {
    let api = FakeApiServer::start().await;
    api.put_node(
        "node-a",
        json!({}),
        json!([{"key": "iamlet.io/agent-not-ready", "effect": "NoSchedule"},
               {"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
               {"key": "iamlet.io/agent-not-ready", "effect": "NoExecute"}]),
    );
    let node = TestNode::start_with_api(api, &[]).await;
    eventually(10, "the startup taint to be removed", async || {
        node.api.node("node-a").unwrap()["spec"]["taints"]
            == json!([{"key": "dedicated", "value": "infra", "effect": "NoSchedule"}])
    })
    .await;
    let patches: Vec<String> =
        node.api.requests().into_iter().filter(|r| r.starts_with("PATCH /api/v1/nodes/")).collect();
    assert_eq!(patches, ["PATCH /api/v1/nodes/node-a?"], "one patch, of this node only");
}

#[tokio::test]
async fn another_taint_key_can_be_named() {
    let api = FakeApiServer::start().await;
    api.put_node("node-a", json!({}), json!([{"key": "example.com/imds-guard", "effect": "NoSchedule"}]));
    let node = TestNode::start_with_api(api, &["--startup-taint=example.com/imds-guard"]).await;
    eventually(10, "the named taint to be removed", async || {
        node.api.node("node-a").unwrap()["spec"]["taints"] == json!([])
    })
    .await;
}

#[tokio::test]
async fn a_node_answering_imdsv1_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exposed =
        TestNode::start_with(FakeApiServer::start().await, FakeImds::start_with(listener, Tokens::Optional), &[]).await;
    eventually(10, "the exposure gauge", async || {
        exposed.metric_exported("iamlet_node_imdsv1_enabled").await == Some(1.0)
    })
    .await;

    let protected = TestNode::start(&[]).await;
    eventually(10, "the exposure gauge", async || {
        protected.metric_exported("iamlet_node_imdsv1_enabled").await == Some(0.0)
    })
    .await;
}
