//! Pods come and go: the race at pod start, deletion, IP reuse, other nodes' pods, watch
//! disconnects and 410 Gone, namespace restrictions, readiness and API credentials.

use std::time::{Duration, Instant};

use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::eventually;
use iamlet_testkit::node::TestNode;
use serde_json::json;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn a_request_that_arrives_before_its_pod_is_answered_once_the_watch_delivers_it() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=5s"]).await;
    let started = Instant::now();
    let request = tokio::spawn({
        let app = node.app();
        async move { iamlet_testkit::pod_client::get("127.0.0.20", app, CREDS).await }
    });
    eventually(5, "the request to reach the agent", async || {
        node.metric("iamlet_http_requests_in_flight").await == 1.0
    })
    .await;
    assert!(!request.is_finished(), "the request waits for the pod");
    node.api.create_pod(pod("shop", "early").ip("127.0.0.20").role("app").build());
    let reply = request.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "app"));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "answered when the pod arrived, not at the deadline: {waited:?}");
}

#[tokio::test]
async fn a_pod_that_never_arrives_gets_a_404_at_the_deadline() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=400ms"]).await;
    let started = Instant::now();
    let reply = node.get("127.0.0.21", CREDS).await;
    assert_eq!(reply.status, 404);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn a_deleted_pod_loses_access() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=100ms"]).await;
    node.api.create_pod(pod("shop", "gone").ip("127.0.0.22").role("app").build());
    assert_eq!(node.get("127.0.0.22", &format!("{CREDS}app")).await.status, 200);
    node.api.delete_pod("shop", "gone");
    eventually(5, "the deleted pod to lose access", async || node.get("127.0.0.22", CREDS).await.status == 404).await;

    // A pod that finishes (Succeeded) loses access too, though it is not deleted.
    node.api.create_pod(pod("shop", "job").ip("127.0.0.23").role("app").build());
    assert_eq!(node.get("127.0.0.23", CREDS).await.status, 200);
    node.api.update_pod("shop", "job", |p| p["status"]["phase"] = json!("Succeeded"));
    eventually(5, "the finished pod to lose access", async || node.get("127.0.0.23", CREDS).await.status == 404).await;
}

#[tokio::test]
async fn a_reused_ip_belongs_to_the_new_pod_not_the_terminating_one() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "old").ip("127.0.0.24").role("old-role").created("2026-01-01T00:00:00Z").build());
    assert_eq!(node.get("127.0.0.24", CREDS).await.body, "old-role");

    node.api.update_pod("shop", "old", |p| p["metadata"]["deletionTimestamp"] = json!("2026-01-01T01:00:00Z"));
    node.api.create_pod(
        pod("shop", "new").ip("127.0.0.24").role("new-role").phase("Pending").created("2026-01-01T01:00:01Z").build(),
    );
    eventually(5, "the new pod to own the IP", async || node.get("127.0.0.24", CREDS).await.body == "new-role").await;
    node.api.delete_pod("shop", "old");
    eventually(5, "the old pod to leave the index", async || node.metric("iamlet_pods_indexed").await == 1.0).await;
    assert_eq!(node.get("127.0.0.24", CREDS).await.body, "new-role", "deleting the old pod keeps the new one");
    assert_eq!(node.get("127.0.0.24", &format!("{CREDS}old-role")).await.status, 404);
}

#[tokio::test]
async fn only_this_nodes_pod_network_pods_are_served() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=200ms"]).await;
    node.api.create_pod(pod("shop", "elsewhere").node("node-b").ip("127.0.0.25").role("app").build());
    node.api.create_pod(pod("kube-system", "proxy").ip("127.0.0.26").role("app").host_network().build());
    node.api.create_pod(pod("shop", "here").ip("127.0.0.27").role("app").build());
    assert_eq!(node.get("127.0.0.27", CREDS).await.status, 200);
    assert_eq!(node.get("127.0.0.25", CREDS).await.status, 404, "another node's pod");
    assert_eq!(node.get("127.0.0.26", CREDS).await.status, 404, "a host-network pod shares the node's IP");
    let watches: Vec<String> = node.api.requests().into_iter().filter(|r| r.starts_with("GET /api/v1/pods?")).collect();
    assert!(!watches.is_empty());
    assert!(
        watches.iter().all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "every list and watch is scoped to the node: {watches:?}"
    );
    let calls = node.sts.assume_role_calls();
    assert_eq!(calls.len(), 1, "only this node's pod was prefetched: {calls:?}");
}

#[tokio::test]
async fn the_index_survives_dropped_watches_and_410_gone() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=100ms"]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.28").role("app").build());
    assert_eq!(node.get("127.0.0.28", CREDS).await.status, 200);

    // The connection drops: the watch resumes from its resourceVersion and misses nothing.
    let watches = node.api.watch_count("/api/v1/pods");
    node.api.drop_watches();
    node.api.create_pod(pod("shop", "b").ip("127.0.0.29").role("app").build());
    eventually(10, "the pod created across the disconnect", async || node.get("127.0.0.29", CREDS).await.status == 200)
        .await;
    assert!(node.api.watch_count("/api/v1/pods") > watches, "the watch reconnected");

    // A pod deleted while the watch was down, with its event compacted away: resuming gets
    // 410 Gone, the agent re-lists, and the stale pod is dropped.
    node.api.delete_pod_unseen("shop", "a");
    node.api.drop_watches();
    eventually(15, "the re-list to drop the pod deleted unseen", async || {
        node.get("127.0.0.28", CREDS).await.status == 404
    })
    .await;
    assert_eq!(node.get("127.0.0.29", CREDS).await.status, 200, "the re-list keeps live pods");
    assert_eq!(node.admin_get("/readyz").await.status, 200);
}

#[tokio::test]
async fn namespace_restrictions_allow_only_listed_roles() {
    let api = FakeApiServer::start().await;
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"app-*\"]"}));
    api.put_namespace("open", json!({}));
    let node = TestNode::start_with_api(api, &["--namespace-restrictions"]).await;
    node.api.create_pod(pod("team", "web").ip("127.0.0.30").role("app-web").build());
    node.api.create_pod(pod("team", "admin").ip("127.0.0.31").role("admin").build());
    node.api.create_pod(pod("open", "web").ip("127.0.0.32").role("app-web").build());

    assert_eq!(node.get("127.0.0.30", &format!("{CREDS}app-web")).await.status, 200);
    let denied = node.get("127.0.0.31", CREDS).await;
    assert_eq!(denied.status, 404);
    assert!(denied.body.contains("not allowed in namespace team"), "{}", denied.body);
    assert_eq!(node.get("127.0.0.32", CREDS).await.status, 404, "a namespace without the annotation allows nothing");

    node.api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"app-*\", \"admin\"]"}));
    eventually(5, "the namespace update to allow admin", async || node.get("127.0.0.31", CREDS).await.status == 200)
        .await;
    let calls = node.sts.assume_role_calls();
    assert!(
        calls.iter().all(|c| c["RoleArn"] != iamlet_testkit::role_arn("admin") || c["RoleSessionName"] == "team.admin")
    );
}

#[tokio::test]
async fn namespace_entries_without_an_account_stay_in_the_nodes_account() {
    // No base ARN: annotations hold full ARNs, and `app-*` names no account. The node's
    // account comes from its instance profile (the fake IMDS's iam/info: 123456789012).
    let api = FakeApiServer::start().await;
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"app-*\"]"}));
    let node = TestNode::start_with_api(api, &["--namespace-restrictions", "--base-role-arn="]).await;
    node.api.create_pod(pod("team", "ours").ip("127.0.0.35").role(&iamlet_testkit::role_arn("app-x")).build());
    node.api.create_pod(pod("team", "theirs").ip("127.0.0.36").role("arn:aws:iam::999999999999:role/app-x").build());
    node.api.create_pod(pod("team", "deeper").ip("127.0.0.39").role(&iamlet_testkit::role_arn("app-x/admin")).build());
    assert_eq!(node.get("127.0.0.35", &format!("{CREDS}app-x")).await.status, 200);
    let denied = node.get("127.0.0.36", CREDS).await;
    assert_eq!(denied.status, 404, "another account's role with a matching name");
    assert!(denied.body.contains("not allowed in namespace team"), "{}", denied.body);
    assert_eq!(node.get("127.0.0.39", CREDS).await.status, 404, "a glob's * does not cross a path separator");
    assert!(node.sts.assume_role_calls().iter().all(|c| !c["RoleArn"].contains("999999999999")));
}

#[tokio::test]
async fn regexp_restrictions_are_anchored() {
    let api = FakeApiServer::start().await;
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"app-[a-z]+\"]"}));
    let node =
        TestNode::start_with_api(api, &["--namespace-restrictions", "--namespace-restriction-format=regexp"]).await;
    node.api.create_pod(pod("team", "ok").ip("127.0.0.33").role("app-web").build());
    node.api.create_pod(pod("team", "no").ip("127.0.0.34").role("app-web-2").build());
    assert_eq!(node.get("127.0.0.33", CREDS).await.status, 200);
    assert_eq!(node.get("127.0.0.34", CREDS).await.status, 404);
}

#[tokio::test]
async fn kiams_permitted_annotation_is_honoured_beside_kube2iams_list() {
    // A namespace migrated from kiam keeps its regexp; one that has both allows either.
    let api = FakeApiServer::start().await;
    api.put_namespace("legacy", json!({"iam.amazonaws.com/permitted": "app-.*|batch"}));
    api.put_namespace(
        "both",
        json!({"iam.amazonaws.com/permitted": "batch", "iam.amazonaws.com/allowed-roles": "[\"app-*\"]"}),
    );
    let node = TestNode::start_with_api(api, &["--namespace-restrictions"]).await;
    let pods = [
        ("legacy", "web", "127.0.0.100", "app-web", 200),
        ("legacy", "batch", "127.0.0.101", "batch", 200),
        ("legacy", "nightly", "127.0.0.102", "nightly-batch", 404),
        ("legacy", "admin", "127.0.0.103", "admin", 404),
        ("legacy", "theirs", "127.0.0.104", "arn:aws:iam::999999999999:role/app-web", 404),
        ("both", "web", "127.0.0.105", "app-web", 200),
        ("both", "batch", "127.0.0.106", "batch", 200),
        ("both", "admin", "127.0.0.107", "admin", 404),
    ];
    for (namespace, name, ip, role, _) in pods {
        node.api.create_pod(pod(namespace, name).ip(ip).role(role).build());
    }
    for (namespace, name, ip, role, status) in pods {
        assert_eq!(node.get(ip, CREDS).await.status, status, "{namespace}/{name} with {role}");
    }
    assert!(node.sts.assume_role_calls().iter().all(|c| !c["RoleArn"].contains("999999999999")));

    // A change to the expression is followed without a restart.
    node.api.put_namespace("legacy", json!({"iam.amazonaws.com/permitted": "admin"}));
    eventually(5, "the new expression to allow admin", async || node.get("127.0.0.103", CREDS).await.status == 200)
        .await;
    assert_eq!(node.get("127.0.0.100", CREDS).await.status, 404, "app-web is no longer permitted");
}

#[tokio::test]
async fn not_ready_until_the_pod_cache_syncs_and_api_tokens_are_sent() {
    let api = FakeApiServer::start_with(Some("s3cret"), Duration::from_secs(1)).await;
    let sts = iamlet_testkit::sts_proxy::StsProxy::start().await;
    let imds = iamlet_testkit::imds::FakeImds::start().await;

    let state = tempfile::tempdir().unwrap();
    let refused = iamlet_testkit::node::start_agent(&api, &sts, &imds, state.path(), &["--api-token=wrong"]).await;
    // Not ready after the watch has been refused, not merely before it was tried.
    eventually(10, "the pod watch to be refused", async || {
        let metrics = iamlet_testkit::pod_client::get("127.0.0.1", refused.admin_addr.unwrap(), "/metrics").await.body;
        iamlet_testkit::metric_value(&metrics, "iamlet_watch_errors_total").is_some_and(|errors| errors >= 1.0)
    })
    .await;
    let reply = iamlet_testkit::pod_client::get("127.0.0.1", refused.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("pod cache not synced"), "{}", reply.body);
    assert_eq!(iamlet_testkit::pod_client::get("127.0.0.1", refused.admin_addr.unwrap(), "/healthz").await.status, 200);
    refused.stop().await;

    let accepted = iamlet_testkit::node::start_agent(&api, &sts, &imds, state.path(), &["--api-token=s3cret"]).await;
    eventually(10, "readiness with the right token", async || {
        iamlet_testkit::pod_client::get("127.0.0.1", accepted.admin_addr.unwrap(), "/readyz").await.status == 200
    })
    .await;
}

#[tokio::test]
async fn pod_events_say_why_a_pod_has_no_credentials_once_not_per_request() {
    let node = TestNode::start(&["--pod-events", "--sts-timeout=2s", "--iam-role-error-ttl=0s"]).await;
    node.api.create_pod(pod("shop", "plain").ip("127.0.0.35").build());
    node.api.create_pod(pod("shop", "refused").ip("127.0.0.36").role("forbidden").build());
    node.sts.set_failing(true);
    for _ in 0..5 {
        assert_eq!(node.get("127.0.0.35", CREDS).await.status, 404);
    }
    assert_eq!(node.get("127.0.0.36", &format!("{CREDS}forbidden")).await.status, 503);
    // Events are published in the order they are reported, and each request reports before it
    // is answered: once a later pod's event is out, every earlier one is too.
    node.api.create_pod(pod("shop", "last").ip("127.0.0.37").build());
    assert_eq!(node.get("127.0.0.37", CREDS).await.status, 404);
    let last = |e: &serde_json::Value| e["regarding"]["name"] == "last";
    eventually(5, "the last pod's event", async || node.api.events().iter().any(last)).await;
    let events: Vec<_> = node.api.events().into_iter().filter(|e| !last(e)).collect();
    assert_eq!(events.len(), 2, "one per pod and reason, not one per request: {events:?}");
    // Nor one API call per request: kube's recorder would fold repeats into a PATCH of the
    // same event, still a write per request; iamlet does not even report them.
    let writes: Vec<_> = node.api.requests().into_iter().filter(|r| r.contains("/events")).collect();
    assert_eq!(writes.len(), 3, "one write per pod and reason: {writes:?}");
    let denied = events.iter().find(|e| e["regarding"]["name"] == "plain").expect("an event on the pod without a role");
    assert_eq!(denied["reason"], "IAMRoleDenied");
    assert_eq!(denied["type"], "Warning");
    assert_eq!(denied["regarding"]["kind"], "Pod");
    assert!(denied["note"].as_str().unwrap().contains("no role annotation"), "{denied}");
    let failed = events.iter().find(|e| e["regarding"]["name"] == "refused").unwrap();
    assert_eq!(failed["reason"], "IAMAssumeRoleFailed");
    assert!(failed["note"].as_str().unwrap().contains("forbidden"), "{failed}");
    assert_eq!(failed["reportingController"], "iamlet");
}

#[tokio::test]
async fn a_multi_byte_annotation_cannot_stop_the_nodes_events() {
    let node = TestNode::start(&["--pod-events"]).await;
    // 500 × "é" is 1,000 bytes: a cut at a byte count lands inside a character.
    node.api.create_pod(pod("shop", "accented").ip("127.0.0.37").role(&"é".repeat(500)).build());
    assert_eq!(node.get("127.0.0.37", CREDS).await.status, 404);
    eventually(5, "the accented pod's event", async || node.api.events().len() == 1).await;
    let note = node.api.events()[0]["note"].as_str().unwrap().to_string();
    assert!(note.contains("éé") && note.len() <= 1024, "{note}");

    // The publisher is still alive: the next pod's denial is reported too.
    node.api.create_pod(pod("shop", "next").ip("127.0.0.38").build());
    assert_eq!(node.get("127.0.0.38", CREDS).await.status, 404);
    eventually(5, "the next pod's event", async || node.api.events().iter().any(|e| e["regarding"]["name"] == "next"))
        .await;
}

#[tokio::test]
async fn a_reused_ip_never_gets_the_stopped_pods_role() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=1s", "--debug"]).await;
    // What the agent's index holds of the pod `name`, once the watch has delivered it.
    let seen = async |name: &str, field: &str| {
        let store = node.admin_get("/debug/store").await.json();
        store["pods"].as_array().unwrap().iter().any(|p| p["name"] == name && p[field] == true)
    };
    for (name, ip) in [("old", "127.0.0.60"), ("gone", "127.0.0.61")] {
        node.api.create_pod(pod("shop", name).ip(ip).role("old-role").build());
    }
    assert_eq!(node.get("127.0.0.60", CREDS).await.body, "old-role");
    // Still shutting down, containers running: graceful shutdown keeps its credentials.
    for name in ["old", "gone"] {
        node.api.update_pod("shop", name, |p| {
            p["metadata"]["deletionTimestamp"] = json!("2026-11-22T10:00:00Z");
            p["status"]["containerStatuses"] = json!([{"name": "app", "state": {"running": {}}}]);
        });
    }
    eventually(5, "the terminating pod to be seen", async || seen("old", "terminating").await).await;
    assert_eq!(node.get("127.0.0.60", CREDS).await.body, "old-role");

    // Its containers stop: the CNI may hand its IP to the next pod before the watch says so.
    for name in ["old", "gone"] {
        node.api.update_pod("shop", name, |p| {
            p["status"]["containerStatuses"] = json!([{"name": "app", "state": {"terminated": {"exitCode": 0}}}]);
        });
    }
    eventually(5, "the stopped pods to be seen", async || {
        seen("old", "stopped").await && seen("gone", "stopped").await
    })
    .await;
    // A request from the old IP waits for the watch, and the new owner is what it gets.
    let waiting = tokio::spawn({
        let app = node.app();
        async move { iamlet_testkit::pod_client::get("127.0.0.60", app, CREDS).await }
    });
    node.api.create_pod(pod("shop", "new").ip("127.0.0.60").role("new-role").phase("Pending").build());
    let reply = waiting.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "new-role"));
    // With no new owner, the wait ends in a 404, never in the stopped pod's role.
    let reply = node.get("127.0.0.61", CREDS).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("no pod with IP 127.0.0.61"), "{}", reply.body);
}

#[tokio::test]
async fn a_failing_watch_turns_not_ready_and_says_how_stale_while_known_pods_are_served() {
    let node = TestNode::start(&["--pod-watch-stale-after=1s"]).await;
    node.api.create_pod(pod("shop", "known").ip("127.0.0.62").role("app").build());
    assert_eq!(node.get("127.0.0.62", &format!("{CREDS}app")).await.status, 200);

    node.api.set_outage(true);
    eventually(20, "not ready for a stale watch", async || {
        let ready = node.admin_get("/readyz").await;
        ready.status == 503 && ready.body.contains("pod watch failing")
    })
    .await;
    eventually(10, "the staleness gauge", async || node.metric("iamlet_pod_watch_stale_seconds").await >= 1.0).await;
    assert_eq!(node.get("127.0.0.62", &format!("{CREDS}app")).await.status, 200, "known pods keep being served");

    node.api.set_outage(false);
    eventually(60, "ready once the API server answers again", async || node.admin_get("/readyz").await.status == 200)
        .await;
}
