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
        plain(&String::from_utf8_lossy(&output.stdout)),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The report with each run of spaces made one, so expectations do not depend on the
/// alignment of its labels.
fn plain(report: &str) -> String {
    report.lines().map(|line| line.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n")
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
        "pod: shop/web",
        "node: node-a",
        "ips: 10.0.0.5",
        "role: arn:aws:iam::123456789012:role/app (from the pod's annotation)",
        "external id: \"x-1\"",
        "session name: shop.web",
        "sts: AssumeRole succeeded",
        "verdict: the pod gets arn:aws:iam::123456789012:role/app",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    let calls = sts.assume_role_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0]["RoleSessionName"].as_str(), calls[0]["ExternalId"].as_str()), ("shop.web", "x-1"));

    sts.set_failing(true);
    let (code, stdout, _) = explain(&api, &sts, &["shop/web", "--check-sts", "--sts-timeout=2s"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("sts: AssumeRole failed") && stdout.contains("STS refuses it"), "{stdout}");
}

#[tokio::test]
async fn explains_why_a_pod_gets_nothing() {
    let (api, sts) = (FakeApiServer::start().await, StsProxy::start().await);
    api.put_namespace("team", json!({"iam.amazonaws.com/allowed-roles": "[\"batch-*\"]"}));
    api.create_pod(pod("team", "web").ip("10.0.0.6").role("app").build());
    api.create_pod(pod("team", "plain").ip("10.0.0.7").build());

    let (code, stdout, _) = explain(&api, &sts, &["team/web", "--namespace-restrictions"]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("namespace: iam.amazonaws.com/allowed-roles lists [\"batch-*\"]"), "{stdout}");
    assert!(stdout.contains("verdict: the pod gets no credentials: role arn:aws:iam::123456789012:role/app is not allowed in namespace team"), "{stdout}");

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

#[tokio::test]
async fn explains_a_role_that_comes_from_the_pods_service_account() {
    let (api, sts) = (FakeApiServer::start().await, StsProxy::start().await);
    let irsa = "arn:aws:iam::123456789012:role/web-irsa";
    api.put_service_account("shop", "web-sa", json!({"eks.amazonaws.com/role-arn": irsa}));
    api.create_pod(pod("shop", "web").ip("10.0.0.8").service_account("web-sa").build());

    let (code, stdout, stderr) = explain(&api, &sts, &["shop/web", "--service-account-roles", "--check-sts"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for expected in [
        "annotation: iam.amazonaws.com/role is not set".to_string(),
        format!("service account: shop/web-sa: eks.amazonaws.com/role-arn = \"{irsa}\""),
        format!("role: {irsa} (from ServiceAccount shop/web-sa's eks.amazonaws.com/role-arn)"),
        "sts: AssumeRole succeeded".to_string(),
        format!("verdict: the pod gets {irsa}"),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} missing from:\n{stdout}");
    }
    assert_eq!(sts.assume_role_calls()[0]["RoleArn"], irsa);

    // Without the flag, the report says the ServiceAccount is not consulted.
    let (code, stdout, _) = explain(&api, &sts, &["shop/web"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("shop/web-sa: not consulted (--service-account-roles is off)"), "{stdout}");
}
