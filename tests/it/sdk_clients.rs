//! Real SDK clients as a pod runs them: aws-config's IMDS credential provider (Rust) and
//! botocore's default chain (Python) fetch credentials from the agent, then call STS
//! GetCallerIdentity (moto) with them and see the pod's assumed role.
//!
//! The SDKs connect from 127.0.0.1, so the pod here has that IP.

use std::process::Command;

use aws_config::BehaviorVersion;
use aws_sdk_sts::config::{ProvideCredentials, Region};
use iamlet_testkit::apiserver::pod;
use iamlet_testkit::moto::{moto, venv_bin};
use iamlet_testkit::node::TestNode;

async fn caller_arn(credentials: aws_sdk_sts::config::Credentials) -> String {
    let config = aws_sdk_sts::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&moto().url)
        .credentials_provider(credentials)
        .build();
    let identity = aws_sdk_sts::Client::from_conf(config).get_caller_identity().send().await.unwrap();
    identity.arn.unwrap()
}

fn rust_provider(node: &TestNode) -> aws_config::imds::credentials::ImdsCredentialsProvider {
    let client = aws_config::imds::Client::builder().endpoint(format!("http://{}", node.app())).unwrap().build();
    aws_config::imds::credentials::ImdsCredentialsProvider::builder().imds_client(client).build()
}

#[tokio::test]
async fn aws_config_imds_provider_gets_the_pods_role() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "rust-app").ip("127.0.0.1").role("sdk-role").build());
    let credentials = rust_provider(&node).provide_credentials().await.expect("credentials from the agent");
    assert!(credentials.session_token().is_some());
    let arn = caller_arn(credentials).await;
    assert!(arn.ends_with(":assumed-role/sdk-role/shop.rust-app"), "{arn}");
    // aws-config speaks IMDSv2: it asked for a token first and used it.
    let metrics = node.admin_get("/metrics").await.body;
    assert!(metrics.contains("iamlet_http_requests_total{route=\"token\",code=\"200\"}"), "{metrics}");
}

#[tokio::test]
async fn aws_config_imds_provider_gets_nothing_for_a_pod_without_a_role() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "no-role").ip("127.0.0.1").build());
    let error = rust_provider(&node).provide_credentials().await.expect_err("no role, no credentials");
    let text = format!("{error:?}");
    assert!(!text.contains("NODE-ACCESS-KEY"), "{text}");
}

/// Runs botocore against the agent at `app`, on a blocking thread.
async fn botocore(app: std::net::SocketAddr) -> (i32, serde_json::Value) {
    tokio::task::spawn_blocking(move || run_botocore(app)).await.unwrap()
}

fn run_botocore(app: std::net::SocketAddr) -> (i32, serde_json::Value) {
    let python = venv_bin("python");
    assert!(python.exists(), "{} not found: run scripts/test.sh (it creates .venv with botocore)", python.display());
    let output = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/botocore_identity.py"))
        .env_clear()
        .envs(iamlet_testkit::clean_sdk_env())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", format!("http://{app}/"))
        .env("STS_URL", &moto().url)
        .output()
        .expect("running python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let parsed = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!("botocore printed {stdout:?}, stderr {:?}", String::from_utf8_lossy(&output.stderr))
    });
    (output.status.code().unwrap_or(-1), parsed)
}

#[tokio::test]
async fn botocore_gets_the_pods_role() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "py-app").ip("127.0.0.1").role("boto-role").build());
    let (code, result) = botocore(node.app()).await;
    assert_eq!(code, 0, "{result}");
    assert_eq!(result["method"], "iam-role", "botocore used the instance metadata provider");
    let arn = result["arn"].as_str().unwrap();
    assert!(arn.ends_with(":assumed-role/boto-role/shop.py-app"), "{arn}");
}

#[tokio::test]
async fn botocore_gets_nothing_for_a_pod_without_a_role() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "plain").ip("127.0.0.1").build());
    let (code, result) = botocore(node.app()).await;
    assert_eq!(code, 3, "{result}");
}
