//! `--service-account-roles`: roles declared on ServiceAccounts, kube2iam's annotation or
//! IRSA's, for pods without their own; precedence, namespace restrictions, live changes, and
//! never a guess while the ServiceAccounts are not known yet.

use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::node::TestNode;
use iamlet_testkit::{eventually, role_arn};
use serde_json::{Value, json};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// The roles of the credentials the agent holds for `session`, from `/debug/store`.
async fn cached_roles(node: &TestNode, session: &str) -> Vec<String> {
    let store: Value = serde_json::from_str(&node.admin_get("/debug/store").await.body).unwrap();
    let credentials = store["credentials"].as_array().unwrap();
    credentials.iter().filter(|c| c["session"] == session).map(|c| c["role"].as_str().unwrap().to_string()).collect()
}

/// The role name the pod at `ip` is told it has, after checking its credentials are served.
async fn role_of(node: &TestNode, ip: &str) -> String {
    let name = node.get(ip, CREDS).await;
    assert_eq!(name.status, 200, "{ip}: {}", name.body);
    let credentials = node.get(ip, &format!("{CREDS}{}", name.body)).await;
    assert_eq!(credentials.status, 200, "{ip}: {}", credentials.body);
    name.body
}

#[tokio::test]
async fn a_pod_without_its_own_annotation_gets_its_service_accounts_role() {
    let api = FakeApiServer::start().await;
    api.put_service_account("shop", "kube2iam-style", json!({"iam.amazonaws.com/role": "sa-role"}));
    api.put_service_account("shop", "irsa", json!({"eks.amazonaws.com/role-arn": role_arn("irsa-role")}));
    api.put_service_account(
        "shop",
        "both",
        json!({"iam.amazonaws.com/role": "sa-role", "eks.amazonaws.com/role-arn": role_arn("irsa-role")}),
    );
    api.put_service_account("shop", "plain", json!({"team": "shop"}));
    let node = TestNode::start_with_api(api, &["--service-account-roles", "--default-role=fallback"]).await;
    let pods = [
        ("kube2iam", "kube2iam-style", None, "127.0.0.40", "sa-role"),
        ("irsa", "irsa", None, "127.0.0.41", "irsa-role"),
        ("both", "both", None, "127.0.0.42", "sa-role"),
        ("own", "irsa", Some("own-role"), "127.0.0.43", "own-role"),
        ("plain", "plain", None, "127.0.0.44", "fallback"),
        ("missing", "not-created", None, "127.0.0.45", "fallback"),
    ];
    for (name, account, own, ip, _) in pods {
        let mut builder = pod("shop", name).ip(ip).service_account(account);
        if let Some(role) = own {
            builder = builder.role(role);
        }
        node.api.create_pod(builder.build());
    }
    for (name, account, own, ip, expected) in pods {
        assert_eq!(role_of(&node, ip).await, expected, "pod {name} as {account}, own annotation {own:?}");
    }
    for (name, _, _, _, expected) in pods {
        let session = format!("shop.{name}");
        let calls = node.sts.assume_role_calls();
        assert!(
            calls.iter().any(|c| c["RoleSessionName"] == session && c["RoleArn"] == role_arn(expected)),
            "{session} assumed {expected}: {calls:?}"
        );
    }
}

#[tokio::test]
async fn service_accounts_are_not_consulted_unless_asked() {
    let api = FakeApiServer::start().await;
    api.put_service_account("shop", "irsa", json!({"eks.amazonaws.com/role-arn": role_arn("irsa-role")}));
    let node = TestNode::start_with_api(api, &["--default-role=fallback"]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.46").service_account("irsa").build());
    assert_eq!(role_of(&node, "127.0.0.46").await, "fallback");
    let requests = node.api.requests();
    assert!(
        requests.iter().all(|r| !r.contains("serviceaccounts")),
        "no ServiceAccount is read (nor RBAC for it needed) without the flag: {requests:?}"
    );
}

#[tokio::test]
async fn namespace_restrictions_apply_to_service_account_roles() {
    let api = FakeApiServer::start().await;
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"app-*\"]"}));
    api.put_service_account("team", "web", json!({"eks.amazonaws.com/role-arn": role_arn("app-web")}));
    api.put_service_account("team", "admin", json!({"iam.amazonaws.com/role": "admin"}));
    api.put_service_account(
        "team",
        "theirs",
        json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::999999999999:role/app-web"}),
    );
    let node = TestNode::start_with_api(api, &["--service-account-roles", "--namespace-restrictions"]).await;
    for (name, ip) in [("web", "127.0.0.50"), ("admin", "127.0.0.51"), ("theirs", "127.0.0.52")] {
        node.api.create_pod(pod("team", name).ip(ip).service_account(name).build());
    }
    assert_eq!(role_of(&node, "127.0.0.50").await, "app-web");
    for ip in ["127.0.0.51", "127.0.0.52"] {
        let denied = node.get(ip, CREDS).await;
        assert_eq!(denied.status, 404, "{ip}: {}", denied.body);
        assert!(denied.body.contains("not allowed in namespace team"), "{}", denied.body);
    }
    let calls = node.sts.assume_role_calls();
    assert!(calls.iter().all(|c| c["RoleArn"] == role_arn("app-web")), "only the allowed role is assumed: {calls:?}");
}

#[tokio::test]
async fn a_changed_service_account_role_is_followed_without_a_restart() {
    let api = FakeApiServer::start().await;
    api.put_service_account("shop", "web", json!({"iam.amazonaws.com/role": "before"}));
    let node = TestNode::start_with_api(api, &["--service-account-roles", "--debug"]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.55").service_account("web").build());
    assert_eq!(role_of(&node, "127.0.0.55").await, "before");

    // The change re-resolves the pod: the new role's credentials are fetched before the pod
    // asks, and the old role's are forgotten.
    node.api.put_service_account("shop", "web", json!({"eks.amazonaws.com/role-arn": role_arn("after")}));
    eventually(5, "the new role prefetched and the old one forgotten", async || {
        cached_roles(&node, "shop.web").await == [role_arn("after")]
    })
    .await;
    assert_eq!(role_of(&node, "127.0.0.55").await, "after");
    let stale = node.get("127.0.0.55", &format!("{CREDS}before")).await;
    assert_eq!(stale.status, 404, "the old role is not served: {}", stale.body);

    // Without a role on the ServiceAccount (and no default role) the pod has none.
    node.api.put_service_account("shop", "web", json!({}));
    eventually(5, "the role to be withdrawn", async || node.get("127.0.0.55", CREDS).await.status == 404).await;
    let denied = node.get("127.0.0.55", CREDS).await;
    assert!(denied.body.contains("neither the pod nor its ServiceAccount shop/web names a role"), "{}", denied.body);
    eventually(5, "the withdrawn role's credentials forgotten", async || {
        cached_roles(&node, "shop.web").await.is_empty()
    })
    .await;

    // A ServiceAccount created again, then deleted, is followed too.
    node.api.put_service_account("shop", "web", json!({"iam.amazonaws.com/role": "again"}));
    eventually(5, "the recreated role", async || node.get("127.0.0.55", CREDS).await.body == "again").await;
    node.api.delete_service_account("shop", "web");
    eventually(5, "the deleted ServiceAccount's role withdrawn", async || {
        node.get("127.0.0.55", CREDS).await.status == 404
    })
    .await;
}

#[tokio::test]
async fn a_pod_is_never_given_the_default_role_while_service_accounts_are_unknown() {
    // The ClusterRole was not updated for --service-account-roles: the ServiceAccount list is
    // refused. A pod without its own annotation must not fall back to the default role
    // (its ServiceAccount may name another), nor may the node count as ready.
    let api = FakeApiServer::start().await;
    api.forbid("serviceaccounts");
    let sts = iamlet_testkit::sts_proxy::StsProxy::start().await;
    let imds = iamlet_testkit::imds::FakeImds::start().await;
    let flags = ["--service-account-roles", "--default-role=fallback", "--backoff-max-elapsed-time=300ms"];
    let state = tempfile::tempdir().unwrap();
    let agent = iamlet_testkit::node::start_agent(&api, &sts, &imds, state.path(), &flags).await;
    let admin = agent.admin_addr.unwrap();
    api.create_pod(pod("shop", "web").ip("127.0.0.57").service_account("irsa").build());
    api.create_pod(pod("shop", "own").ip("127.0.0.58").role("own-role").build());
    eventually(10, "both pods indexed", async || {
        let metrics = iamlet_testkit::pod_client::get("127.0.0.1", admin, "/metrics").await.body;
        iamlet_testkit::metric_value(&metrics, "iamlet_pods_indexed") == Some(2.0)
    })
    .await;
    eventually(10, "the ServiceAccount watch to be refused", async || {
        let metrics = iamlet_testkit::pod_client::get("127.0.0.1", admin, "/metrics").await.body;
        iamlet_testkit::metric_value(&metrics, "iamlet_watch_errors_total{watch=\"serviceaccounts\"}")
            .is_some_and(|errors| errors >= 1.0)
    })
    .await;
    let ready = iamlet_testkit::pod_client::get("127.0.0.1", admin, "/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("ServiceAccount cache not synced"), "{}", ready.body);

    let deferred = iamlet_testkit::pod_client::get("127.0.0.57", agent.app_addr, CREDS).await;
    assert_eq!(deferred.status, 503, "{}", deferred.body);
    assert!(deferred.body.contains("ServiceAccount cache has not synced"), "{}", deferred.body);
    let own = iamlet_testkit::pod_client::get("127.0.0.58", agent.app_addr, CREDS).await;
    assert_eq!((own.status, own.body.as_str()), (200, "own-role"), "a pod's own annotation needs no ServiceAccount");
    let calls = sts.assume_role_calls();
    assert!(
        calls.iter().all(|c| c["RoleArn"] != role_arn("fallback")),
        "the default role was never assumed: {calls:?}"
    );
    agent.stop().await;
}
