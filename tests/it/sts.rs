//! What reaches STS and when: parameters, prefetch, one call per key, refresh and outages.
//! STS is moto's server behind a proxy that records every call.

use std::time::Duration;

use iamlet_testkit::apiserver::pod;
use iamlet_testkit::node::TestNode;
use iamlet_testkit::{eventually, role_arn};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn assume_role_carries_the_external_id_a_named_session_and_twice_the_ttl() {
    let node = TestNode::start(&["--iam-role-session-ttl=20m"]).await;
    node.api.create_pod(
        pod("payments", "api-7d9f")
            .ip("127.0.0.40")
            .role("app")
            .annotation("iam.amazonaws.com/external-id", "ext-42")
            .build(),
    );
    assert_eq!(node.get("127.0.0.40", &format!("{CREDS}app")).await.status, 200);
    let calls = node.sts.assume_role_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call["RoleArn"], role_arn("app"));
    assert_eq!(call["ExternalId"], "ext-42");
    assert_eq!(call["RoleSessionName"], "payments.api-7d9f", "CloudTrail shows the pod");
    assert_eq!(call["DurationSeconds"], "2400");
}

#[tokio::test]
async fn sessions_never_ask_for_more_than_the_one_hour_role_chaining_cap() {
    // kube2iam installs sometimes run with a 1h TTL: sessions of 2h would fail on every call
    // made with role credentials (an instance profile, IRSA).
    let node = TestNode::start(&["--iam-role-session-ttl=1h"]).await;
    node.api.create_pod(pod("payments", "api").ip("127.0.0.49").role("app").build());
    let reply = node.get("127.0.0.49", &format!("{CREDS}app")).await;
    assert_eq!(reply.status, 200);
    let calls = node.sts.assume_role_calls();
    assert_eq!(calls[0]["DurationSeconds"], "3600", "{calls:?}");
    // What the pod holds has far more than the SDKs' 15-minute refresh window left.
    let expiration = humantime::parse_rfc3339(reply.json()["Expiration"].as_str().unwrap()).unwrap();
    let left = expiration.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > std::time::Duration::from_secs(30 * 60), "{left:?}");
}

#[tokio::test]
async fn the_same_role_with_another_external_id_is_another_session() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(
        pod("a", "p").ip("127.0.0.41").role("app").annotation("iam.amazonaws.com/external-id", "one").build(),
    );
    node.api.create_pod(
        pod("a", "q").ip("127.0.0.42").role("app").annotation("iam.amazonaws.com/external-id", "two").build(),
    );
    let first = node.get("127.0.0.41", &format!("{CREDS}app")).await.json();
    let second = node.get("127.0.0.42", &format!("{CREDS}app")).await.json();
    assert_ne!(first["AccessKeyId"], second["AccessKeyId"]);
    let mut ids: Vec<String> = node.sts.assume_role_calls().iter().map(|c| c["ExternalId"].clone()).collect();
    ids.sort();
    assert_eq!(ids, ["one", "two"]);
}

#[tokio::test]
async fn credentials_are_prefetched_when_the_pod_appears() {
    let node = TestNode::start(&["--debug"]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.43").role("app").build());
    // Wait for the prefetched credentials to be cached, not merely asked of STS: between the
    // two, a request would join the fetch and count as a miss.
    eventually(5, "the prefetched credentials in the cache", async || {
        let store = node.admin_get("/debug/store").await.json();
        store["credentials"].as_array().is_some_and(|c| c.iter().any(|k| k["session"] == "shop.web"))
    })
    .await;
    // Make STS slow: a request that waited on it would now take over a second.
    node.sts.set_delay(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    assert_eq!(node.get("127.0.0.43", &format!("{CREDS}app")).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(500), "served from memory: {:?}", started.elapsed());
    assert_eq!(node.sts.assume_role_calls().len(), 1);
    assert_eq!(node.metric("iamlet_credential_cache_hits_total").await, 1.0);
}

#[tokio::test]
async fn many_concurrent_first_requests_make_one_sts_call() {
    let node = TestNode::start(&[]).await;
    node.sts.set_delay(Duration::from_millis(700));
    node.api.create_pod(pod("shop", "burst").ip("127.0.0.44").role("app").build());
    let app = node.app();
    let requests = (0..30)
        .map(|_| iamlet_testkit::pod_client::get("127.0.0.44", app, "/latest/meta-data/iam/security-credentials/app"));
    let replies = futures::future::join_all(requests).await;
    let keys: std::collections::HashSet<String> =
        replies.iter().map(|r| r.json()["AccessKeyId"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys.len(), 1, "every request got the same credentials");
    assert_eq!(node.sts.assume_role_calls().len(), 1);
}

#[tokio::test]
async fn cached_credentials_are_served_through_an_sts_outage() {
    let node = TestNode::start(&["--sts-timeout=2s", "--iam-role-error-ttl=1s"]).await;
    node.api.create_pod(pod("shop", "steady").ip("127.0.0.45").role("app").build());
    let before = node.get("127.0.0.45", &format!("{CREDS}app")).await.json();

    node.sts.set_failing(true);
    for _ in 0..5 {
        let during = node.get("127.0.0.45", &format!("{CREDS}app")).await;
        assert_eq!(during.status, 200);
        assert_eq!(during.json()["AccessKeyId"], before["AccessKeyId"]);
    }
    // A pod with nothing cached gets a clear error, not somebody else's credentials.
    node.api.create_pod(pod("shop", "newcomer").ip("127.0.0.46").role("other").build());
    let refused = node.get("127.0.0.46", &format!("{CREDS}other")).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("cannot assume role") && refused.body.contains("other"), "{}", refused.body);

    node.sts.set_failing(false);
    eventually(10, "recovery after the outage", async || {
        node.get("127.0.0.46", &format!("{CREDS}other")).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_deleted_pods_credentials_are_forgotten() {
    let node = TestNode::start(&["--debug"]).await;
    node.api.create_pod(pod("shop", "brief").ip("127.0.0.47").role("app").build());
    eventually(5, "the prefetch", async || {
        node.admin_get("/debug/store").await.json()["credentials"].as_array().unwrap().len() == 1
    })
    .await;
    node.api.delete_pod("shop", "brief");
    eventually(5, "the credentials to be forgotten", async || {
        node.admin_get("/debug/store").await.json()["credentials"].as_array().unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_request_behind_a_queue_of_sts_calls_gets_a_bounded_answer() {
    // One STS call at a time, 500 ms each: six new pods make a 3 s queue, longer than the
    // 2 s a request may wait (--sts-timeout).
    let node = TestNode::start(&["--sts-concurrency=1", "--sts-timeout=2s"]).await;
    node.sts.set_delay(Duration::from_millis(500));
    for i in 0..6 {
        node.api.create_pod(pod("shop", &format!("p{i}")).ip(&format!("127.0.1.{}", 10 + i)).role("app").build());
    }
    eventually(5, "the prefetches to start", async || !node.sts.assume_role_calls().is_empty()).await;
    let started = std::time::Instant::now();
    let node = &node;
    let replies = futures::future::join_all(
        (0..6).map(|i| async move { node.get(&format!("127.0.1.{}", 10 + i), &format!("{CREDS}app")).await }),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(2800), "bounded by --sts-timeout: {:?}", started.elapsed());
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(!busy.is_empty(), "the end of the queue is told to come back: {replies:?}");
    assert!(busy.iter().all(|r| r.body.contains("still being fetched")), "{busy:?}");
    // The fetches went on: every pod's next try is answered, with no extra STS call.
    eventually(10, "the queued credentials", async || {
        for i in 0..6 {
            if node.get(&format!("127.0.1.{}", 10 + i), &format!("{CREDS}app")).await.status != 200 {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(node.sts.assume_role_calls().len(), 6, "one STS call per pod, 503s included");
}

/// The session tags of an AssumeRole call (`Tags.member.N.Key/Value`), and its transitive keys.
fn tags_of(call: &iamlet_testkit::sts_proxy::Call) -> (Vec<(String, String)>, Vec<String>) {
    let tags = (1..)
        .map_while(|n| Some((call.get(&format!("Tags.member.{n}.Key"))?, call.get(&format!("Tags.member.{n}.Value"))?)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let transitive = (1..).map_while(|n| call.get(&format!("TransitiveTagKeys.member.{n}")).cloned()).collect();
    (tags, transitive)
}

#[tokio::test]
async fn session_tags_carry_the_pods_attributes_under_pod_identitys_keys() {
    let node = TestNode::start(&["--session-tags", "--cluster-name=prod-eu-1"]).await;
    let uid = node.api.create_pod(pod("payments", "api-0").ip("127.0.0.60").role("app").service_account("api").build());
    assert_eq!(node.get("127.0.0.60", &format!("{CREDS}app")).await.status, 200);
    let calls = node.sts.assume_role_calls();
    let (tags, transitive) = tags_of(&calls[0]);
    let expected = [
        ("eks-cluster-name", "prod-eu-1"),
        ("kubernetes-namespace", "payments"),
        ("kubernetes-service-account", "api"),
        ("kubernetes-pod-name", "api-0"),
        ("kubernetes-pod-uid", uid.as_str()),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(tags, expected, "{calls:?}");
    let keys: Vec<String> = expected.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(transitive, keys, "transitive, as Pod Identity's are");

    // The same pod name recreated (a StatefulSet's) has another uid: its own credentials.
    node.api.delete_pod("payments", "api-0");
    eventually(5, "the deleted pod to lose access", async || node.get("127.0.0.60", CREDS).await.status == 404).await;
    let uid2 =
        node.api.create_pod(pod("payments", "api-0").ip("127.0.0.60").role("app").service_account("api").build());
    assert_eq!(node.get("127.0.0.60", &format!("{CREDS}app")).await.status, 200);
    let calls = node.sts.assume_role_calls();
    let last = tags_of(calls.last().unwrap()).0;
    assert!(last.contains(&("kubernetes-pod-uid".to_string(), uid2.clone())), "{last:?}");
    assert_ne!(uid, uid2);
}

#[tokio::test]
async fn sessions_carry_no_tags_unless_asked() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("payments", "api").ip("127.0.0.61").role("app").build());
    assert_eq!(node.get("127.0.0.61", &format!("{CREDS}app")).await.status, 200);
    let (tags, transitive) = tags_of(&node.sts.assume_role_calls()[0]);
    assert!(tags.is_empty() && transitive.is_empty(), "a trust policy without sts:TagSession keeps working");
}

#[tokio::test]
async fn pods_roles_are_assumed_with_the_intermediate_roles_session_renewed_ahead_of_expiry() {
    use iamlet_testkit::sts_proxy::{ISSUED, SIGNED_BY};
    let intermediate = role_arn("iamlet-intermediate");
    let node = TestNode::start(&[&format!("--assume-role-arn={intermediate}")]).await;
    // STS grants the intermediate role 2-minute sessions at first: inside the renewal window.
    node.sts.set_session_lifetime(&intermediate, Some(Duration::from_secs(120)));
    let pods = ["127.0.0.62", "127.0.0.63", "127.0.0.64", "127.0.0.65"];
    let mut signers = Vec::new();
    for (n, ip) in pods.into_iter().enumerate() {
        if n == 2 {
            node.sts.set_session_lifetime(&intermediate, None);
        }
        node.api.create_pod(pod("shop", &format!("web-{n}")).ip(ip).role("app").build());
        assert_eq!(node.get(ip, &format!("{CREDS}app")).await.status, 200);
        let calls = node.sts.assume_role_calls();
        let session = format!("shop.web-{n}");
        let call = calls.iter().find(|c| c["RoleSessionName"] == session).expect("the pod's AssumeRole");
        signers.push(call[SIGNED_BY].clone());
    }
    let calls = node.sts.assume_role_calls();
    let hops: Vec<_> = calls.iter().filter(|c| c["RoleArn"] == intermediate).collect();
    for hop in &hops {
        assert_eq!(hop[SIGNED_BY], "testing", "the intermediate role is assumed with the node's credentials");
        assert_eq!(hop["RoleSessionName"], "iamlet.node-a", "CloudTrail shows which node's agent");
        assert_eq!(hop["DurationSeconds"], "3600", "within the role-chaining cap");
    }
    let issued: Vec<&str> = hops.iter().map(|hop| hop[ISSUED].as_str()).collect();
    assert_eq!(hops.len(), 3, "renewed while 2 minutes were left, twice; then one session for two pods: {calls:?}");
    assert_eq!(
        signers,
        [issued[0], issued[1], issued[2], issued[2]],
        "each pod's call is signed by the current session"
    );
    assert!(calls.iter().filter(|c| c["RoleArn"] == role_arn("app")).all(|c| c[SIGNED_BY] != "testing"));
}

/// The calls STS saw for `session`, with when each arrived (ms since the epoch).
fn calls_for(node: &TestNode, session: &str) -> Vec<u128> {
    use iamlet_testkit::sts_proxy::AT_MS;
    node.sts
        .assume_role_calls()
        .iter()
        .filter(|call| call["RoleSessionName"] == session)
        .map(|call| call[AT_MS].parse().unwrap())
        .collect()
}

#[tokio::test]
async fn while_sts_throttles_a_cached_pod_is_served_and_a_new_one_gets_a_retryable_error_then_credentials() {
    use iamlet_testkit::sts_proxy::Injected;
    // A long error TTL: a throttled call must never be remembered as a final failure.
    let node = TestNode::start(&["--iam-role-error-ttl=10m", "--backoff-max-elapsed-time=2s"]).await;
    node.api.create_pod(pod("shop", "steady").ip("127.0.0.45").role("app").build());
    let before = node.get("127.0.0.45", &format!("{CREDS}app")).await.json();

    node.sts.inject(Some(Injected::Throttling));
    node.api.create_pod(pod("shop", "newcomer").ip("127.0.0.46").role("other").build());
    eventually(10, "the newcomer's prefetch throttled", async || {
        node.metric("iamlet_sts_assume_role_calls_total{result=\"throttled\"}").await >= 1.0
    })
    .await;
    for _ in 0..5 {
        let during = node.get("127.0.0.45", &format!("{CREDS}app")).await;
        assert_eq!(during.status, 200, "{during:?}");
        assert_eq!(during.json()["AccessKeyId"], before["AccessKeyId"], "the cached credentials, not an error");
    }
    let started = std::time::Instant::now();
    let refused = node.get("127.0.0.46", &format!("{CREDS}other")).await;
    let waited = started.elapsed();
    assert_eq!(refused.status, 503, "an error SDKs retry: {refused:?}");
    assert!(refused.body.contains("Throttling"), "{}", refused.body);
    assert!(waited < Duration::from_millis(2800), "within --backoff-max-elapsed-time: {waited:?}");
    let tries = calls_for(&node, "shop.newcomer").len();
    assert!(tries >= 2, "the request tried again within its wait: {tries} calls");

    node.sts.inject(None);
    let started = std::time::Instant::now();
    let served = node.get("127.0.0.46", &format!("{CREDS}other")).await;
    assert_eq!(
        served.status, 200,
        "served once the throttle lifts, the 10-minute error TTL notwithstanding: {served:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_final_error_is_not_tried_again() {
    use iamlet_testkit::sts_proxy::Injected;
    let node = TestNode::start(&["--iam-role-error-ttl=10m"]).await;
    node.sts.inject(Some(Injected::AccessDenied));
    node.api.create_pod(pod("shop", "denied").ip("127.0.0.47").role("app").build());
    let refused = node.get("127.0.0.47", &format!("{CREDS}app")).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("AccessDenied"), "{}", refused.body);
    // The prefetch's one call, or the request's if it came first: one, and no retry later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(calls_for(&node, "shop.denied").len(), 1, "AccessDenied is final: never retried");
    assert_eq!(node.metric("iamlet_sts_assume_role_calls_total{result=\"error\"}").await, 1.0);
}

#[tokio::test]
async fn the_nodes_calls_stay_within_its_budget_even_while_sts_throttles() {
    use iamlet_testkit::sts_proxy::Injected;
    let (rate, burst) = (5.0, 3.0);
    let node = TestNode::start(&["--sts-max-rps=5", "--sts-burst=3"]).await;
    node.sts.inject(Some(Injected::Throttling));
    let pods = 30;
    for i in 0..pods {
        node.api.create_pod(pod("jobs", &format!("j{i}")).ip(&format!("127.0.2.{}", 10 + i)).role("app").build());
    }
    // Every pod asks at once: each request's first call keeps to the budget alone (three at
    // once, then five a second), and its retries take the prefetches' places.
    let asks = (0..pods).map(|i| {
        let node = &node;
        async move { node.get(&format!("127.0.2.{}", 10 + i), &format!("{CREDS}app")).await }
    });
    let answers = futures::future::join_all(asks).await;
    assert!(answers.iter().all(|answer| answer.status != 200), "STS throttles every call");
    eventually(30, "12 calls", async || node.sts.assume_role_calls().len() >= 12).await;
    let mut at: Vec<u128> =
        node.sts.assume_role_calls().iter().map(|c| c[iamlet_testkit::sts_proxy::AT_MS].parse().unwrap()).collect();
    at.sort();
    let first = at[0];
    for (i, t) in at.iter().enumerate() {
        let allowed = burst + rate * (t - first) as f64 / 1000.0;
        // Two calls of slack for the clocks: a call arrives at the proxy a little after its
        // turn, and the burst's first connections may arrive later than calls after them.
        assert!((i + 1) as f64 <= allowed + 2.0, "call {} at +{} ms, over the budget's {allowed:.1}", i + 1, t - first);
    }
    assert!(node.metric_exported("iamlet_sts_budget_tokens").await.is_some());
    eventually(30, "the pace halved", async || {
        node.metric_exported("iamlet_sts_background_pace").await.is_some_and(|pace| pace < rate)
    })
    .await;
}

#[tokio::test]
async fn each_pods_credentials_are_joined_to_it_in_the_log_once() {
    use iamlet_testkit::agent::AgentCommand;
    use iamlet_testkit::apiserver::FakeApiServer;
    use iamlet_testkit::imds::FakeImds;
    use iamlet_testkit::sts_proxy::StsProxy;
    use iamlet_testkit::{AgentFlags, free_port};

    let api = FakeApiServer::start().await;
    api.create_pod(pod("shop", "web-0").ip("127.0.0.48").role("app").service_account("web").build());
    let (sts, imds) = (StsProxy::start().await, FakeImds::start().await);
    let (app, admin) = (free_port(), free_port());
    let flags =
        AgentFlags::loopback(&api.url, &imds.addr).without_startup_taint().ports(app, admin).flag("--log-format=json");
    let mut agent = AgentCommand::new(flags, &sts.url).spawn();
    agent.wait_ready().await;
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], app));
    let mut keys = Vec::new();
    for _ in 0..3 {
        let reply = iamlet_testkit::pod_client::get("127.0.0.48", to, &format!("{CREDS}app")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        keys.push(reply.json());
    }
    let access_key_id = keys[0]["AccessKeyId"].as_str().unwrap().to_string();
    let log = agent.terminate().await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "credentials handed to a pod")
        .collect();
    assert_eq!(lines.len(), 1, "one line for three requests of one pod and AccessKeyId: {lines:?}\n{log}");
    let fields = &lines[0];
    assert_eq!(fields["target"], "iamlet::audit");
    assert_eq!(fields["access_key_id"], access_key_id.as_str());
    assert_eq!((fields["namespace"].as_str(), fields["pod"].as_str()), (Some("shop"), Some("web-0")));
    assert_eq!(fields["service_account"], "web");
    assert_eq!(fields["role"], role_arn("app").as_str());
    assert_eq!(fields["scope"], "pod");
    assert!(fields["uid"].as_str().is_some_and(|uid| !uid.is_empty()), "{fields}");
    let secret = keys[0]["SecretAccessKey"].as_str().unwrap();
    assert!(!log.contains(secret) && !log.contains(keys[0]["Token"].as_str().unwrap()), "no secret in the log");
}

#[tokio::test]
async fn with_source_identity_each_call_names_the_pods_namespace_and_service_account() {
    use iamlet_testkit::sts_proxy::Injected;
    let node = TestNode::start(&["--source-identity"]).await;
    node.api.create_pod(pod("shop", "web-0").ip("127.0.0.49").role("app").service_account("web").build());
    assert_eq!(node.get("127.0.0.49", &format!("{CREDS}app")).await.status, 200);
    let calls = node.sts.assume_role_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].get("SourceIdentity").map(String::as_str), Some("shop@web"));

    // A trust policy without sts:SetSourceIdentity refuses every call: the error says so.
    node.sts.inject(Some(Injected::AccessDenied));
    node.api.create_pod(pod("shop", "api-0").ip("127.0.0.50").role("other").service_account("api").build());
    let refused = node.get("127.0.0.50", &format!("{CREDS}other")).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("sts:SetSourceIdentity"), "{}", refused.body);
}

#[tokio::test]
async fn without_source_identity_none_is_sent() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "web-0").ip("127.0.0.51").role("app").service_account("web").build());
    assert_eq!(node.get("127.0.0.51", &format!("{CREDS}app")).await.status, 200);
    assert!(node.sts.assume_role_calls().iter().all(|call| !call.contains_key("SourceIdentity")));
}

/// The JSON audit lines in an agent's log.
fn audit_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "iamlet::audit")
        .collect()
}

#[tokio::test]
async fn in_role_scope_a_roles_pods_share_one_session_and_the_audit_names_each_pod() {
    use iamlet_testkit::agent::AgentCommand;
    use iamlet_testkit::apiserver::FakeApiServer;
    use iamlet_testkit::imds::FakeImds;
    use iamlet_testkit::sts_proxy::StsProxy;
    use iamlet_testkit::{AgentFlags, free_port};

    let api = FakeApiServer::start().await;
    api.create_pod(pod("shop", "web-0").ip("127.0.0.52").role("app").service_account("web").build());
    api.create_pod(pod("batch", "job-0").ip("127.0.0.53").role("app").service_account("jobs").build());
    api.create_pod(pod("shop", "db-0").ip("127.0.0.54").role("db").service_account("web").build());
    let (sts, imds) = (StsProxy::start().await, FakeImds::start().await);
    let (app, admin) = (free_port(), free_port());
    let flags = AgentFlags::loopback(&api.url, &imds.addr)
        .without_startup_taint()
        .ports(app, admin)
        .flag("--log-format=json")
        .flag("--session-scope=role")
        .flag("--session-tags")
        .flag("--cluster-name=prod");
    let mut agent = AgentCommand::new(flags, &sts.url).spawn();
    agent.wait_ready().await;
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], app));
    let mut access_key = std::collections::HashMap::new();
    for (ip, role) in [("127.0.0.52", "app"), ("127.0.0.53", "app"), ("127.0.0.54", "db")] {
        let reply = iamlet_testkit::pod_client::get(ip, to, &format!("{CREDS}{role}")).await;
        assert_eq!(reply.status, 200, "{ip}: {reply:?}");
        access_key.insert(ip, reply.json()["AccessKeyId"].as_str().unwrap().to_string());
    }
    assert_eq!(access_key["127.0.0.52"], access_key["127.0.0.53"], "two pods of one role, one session");
    assert_ne!(access_key["127.0.0.52"], access_key["127.0.0.54"], "another role, another session");
    let calls = sts.assume_role_calls();
    assert_eq!(calls.len(), 2, "one AssumeRole per role on the node: {calls:?}");
    for call in &calls {
        assert_eq!(call["RoleSessionName"], "iamlet@node-a", "the session names the node: {call:?}");
        let (tags, _) = tags_of(call);
        assert_eq!(
            tags,
            [("eks-cluster-name".to_string(), "prod".to_string())],
            "no one pod's tags in a shared session"
        );
    }

    let log = agent.terminate().await;
    let lines = audit_lines(&log);
    let shared = access_key["127.0.0.52"].as_str();
    let mut named: Vec<(&str, &str, &str)> = lines
        .iter()
        .filter(|line| line["access_key_id"] == shared)
        .map(|line| {
            assert_eq!(line["scope"], "role", "{line}");
            assert_eq!(line["session"], "iamlet@node-a", "{line}");
            (
                line["namespace"].as_str().unwrap(),
                line["pod"].as_str().unwrap(),
                line["service_account"].as_str().unwrap(),
            )
        })
        .collect();
    named.sort();
    assert_eq!(named, [("batch", "job-0", "jobs"), ("shop", "web-0", "web")], "each pod of the shared session: {log}");
}

#[tokio::test]
async fn in_service_account_scope_two_service_accounts_get_two_sessions() {
    let node = TestNode::start(&["--session-scope=service-account", "--source-identity"]).await;
    for (name, ip, service_account) in
        [("web-0", "127.0.0.55", "web"), ("web-1", "127.0.0.56", "web"), ("report-0", "127.0.0.57", "reports")]
    {
        node.api.create_pod(pod("shop", name).ip(ip).role("app").service_account(service_account).build());
    }
    let mut access_keys = Vec::new();
    for ip in ["127.0.0.55", "127.0.0.56", "127.0.0.57"] {
        let reply = node.get(ip, &format!("{CREDS}app")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        access_keys.push(reply.json()["AccessKeyId"].as_str().unwrap().to_string());
    }
    assert_eq!(access_keys[0], access_keys[1], "web-0 and web-1 run as web");
    assert_ne!(access_keys[0], access_keys[2], "report-0 runs as reports");
    let mut sessions: Vec<(String, String)> = node
        .sts
        .assume_role_calls()
        .iter()
        .map(|call| (call["RoleSessionName"].clone(), call.get("SourceIdentity").cloned().unwrap_or_default()))
        .collect();
    sessions.sort();
    assert_eq!(
        sessions,
        [("shop@reports".to_string(), "shop@reports".to_string()), ("shop@web".to_string(), "shop@web".to_string())],
        "one AssumeRole per ServiceAccount, each naming it"
    );
}
