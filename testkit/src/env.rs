//! Environments for subprocesses: SDK clients and agents.

/// A clean environment for an AWS SDK client run as a subprocess: nothing of the caller's
/// AWS configuration leaks in, so the client must find credentials where a pod would.
pub fn clean_sdk_env() -> Vec<(&'static str, String)> {
    vec![
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", "/nonexistent".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_METADATA_SERVICE_TIMEOUT", "2".into()),
        ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "2".into()),
    ]
}

/// The environment of an agent process: test credentials, STS at `sts_url`, and no
/// metadata service for the agent's own SDK (it must never reach a real one).
pub fn agent_env(sts_url: &str) -> Vec<(&'static str, String)> {
    let mut env = clean_sdk_env();
    env.extend([
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_ENDPOINT_URL_STS", sts_url.into()),
    ]);
    env
}
