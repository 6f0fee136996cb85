//! `iamlet explain <namespace>/<pod>` against the fake API server and moto.

use iamlet_testkit::apiserver::{FakeApiServer, pod};
use iamlet_testkit::sts_proxy::StsProxy;
use serde_json::json;

async fn explain(api: &FakeApiServer, sts: &StsProxy, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(iamlet_testkit::agent::binary())
        .arg("explain")
        .args(args)
        .arg(format!("--api-server={}", api.url))
        .arg("--base-role-arn=arn:aws:iam::123456789012:role/")
        .env_clear()
        .envs(iamlet_testkit::agent_env(&sts.url))
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn explains_the_role_a_pod_gets_and_checks_it_with_sts() {
    let (api, sts) = (FakeApiServer::start().await, StsProxy::start().await);
    api.create_pod(
        pod("shop", "web").ip("10.0.0.5").role("app").annotation("iam.amazonaws.com/external-id", "x-1").build(),
    );
    let (code, stdout, stderr) = explain(&api, &sts, &["shop/web", "--check-sts"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for expected in [
        "pod:          shop/web",
        "node:         node-a",
        "ips:          10.0.0.5",
        "role:         arn:aws:iam::123456789012:role/app (from the annotation)",
        "external id:  \"x-1\"",
        "session name: shop.web",
        "sts:          AssumeRole succeeded",
        "verdict:      the pod gets arn:aws:iam::123456789012:role/app",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    let calls = sts.assume_role_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0]["RoleSessionName"].as_str(), calls[0]["ExternalId"].as_str()), ("shop.web", "x-1"));

    sts.set_failing(true);
    let (code, stdout, _) = explain(&api, &sts, &["shop/web", "--check-sts", "--sts-timeout=2s"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("sts:          AssumeRole failed") && stdout.contains("STS refuses it"), "{stdout}");
}

#[tokio::test]
async fn explains_why_a_pod_gets_nothing() {
    let (api, sts) = (FakeApiServer::start().await, StsProxy::start().await);
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"batch-*\"]"}));
    api.create_pod(pod("team", "web").ip("10.0.0.6").role("app").build());
    api.create_pod(pod("team", "plain").ip("10.0.0.7").build());

    let (code, stdout, _) = explain(&api, &sts, &["team/web", "--namespace-restrictions"]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("namespace:  iam.amazonaws.com/allowed-roles lists [\"batch-*\"]"), "{stdout}");
    assert!(stdout.contains("verdict:    the pod gets no credentials: role arn:aws:iam::123456789012:role/app is not allowed in namespace team"), "{stdout}");

    let (code, stdout, _) = explain(&api, &sts, &["team/plain"]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("iam.amazonaws.com/role is not set") && stdout.contains("no role annotation"), "{stdout}");

    let (code, _, stderr) = explain(&api, &sts, &["team/missing"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read pod team/missing") && stderr.contains("not found"), "{stderr}");
    let (code, _, stderr) = explain(&api, &sts, &["no-slash"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(sts.assume_role_calls().is_empty(), "no --check-sts, no STS call");
}
