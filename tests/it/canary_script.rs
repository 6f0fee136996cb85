//! scripts/canary.sh against a stand-in `kubectl` that records its arguments and answers as
//! a cluster would: the commands it runs, in order, and what it tells the operator.

use std::path::Path;
use std::process::Command;

/// A fake kubectl: logs each call's arguments, one line per call; `exec ... aws sts
/// get-caller-identity` prints $FAKE_ARN; `get pod` prints a pod name.
const FAKE_KUBECTL: &str = r#"#!/bin/sh
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  *"aws sts get-caller-identity"*) echo "$FAKE_ARN" ;;
  *"get pod -l"*) printf 'aws-iam-tester-canary-6d5f-x7k2' ;;
  *"logs daemonset/iamlet-canary"*) echo '{"level":"WARN","message":"AssumeRole failed"}' ;;
esac
exit 0
"#;

fn canary(arn: &str) -> (i32, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let kubectl = dir.path().join("kubectl");
    std::fs::write(&kubectl, FAKE_KUBECTL).unwrap();
    std::fs::set_permissions(&kubectl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let log = dir.path().join("calls.log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/canary.sh");
    let output = Command::new("bash")
        .arg(script)
        .args(["ip-10-0-1-23", "arn:aws:iam::123456789012:role/canary-test"])
        .env("PATH", format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap()))
        .env("KUBECTL_LOG", &log)
        .env("FAKE_ARN", arn)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let calls = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect();
    (output.status.code().unwrap_or(-1), text, calls)
}

#[test]
fn a_passing_canary_prints_the_rollout_commands() {
    let (code, text, calls) =
        canary("arn:aws:sts::123456789012:assumed-role/canary-test/iamlet-canary.aws-iam-tester-canary-6d5f");
    assert_eq!(code, 0, "{text}");
    let expected_prefixes = [
        "get node ip-10-0-1-23",
        "label node ip-10-0-1-23 iamlet.io/canary=true --overwrite",
        "taint node ip-10-0-1-23 iamlet.io/canary=true:NoSchedule --overwrite",
        "apply -k manifests/overlays/canary",
        "-n iamlet-canary patch deployment aws-iam-tester-canary",
        "-n kube-system rollout status daemonset/iamlet-canary",
        "-n iamlet-canary rollout status deployment/aws-iam-tester-canary",
        "-n iamlet-canary exec deploy/aws-iam-tester-canary -- aws sts get-caller-identity",
    ];
    assert_eq!(calls.len(), expected_prefixes.len(), "{calls:#?}");
    for (call, prefix) in calls.iter().zip(expected_prefixes) {
        assert!(call.starts_with(prefix), "{call:?} should start with {prefix:?}");
    }
    assert!(
        calls[4].contains(r#""iam.amazonaws.com/role":"arn:aws:iam::123456789012:role/canary-test""#),
        "{}",
        calls[4]
    );
    for call in &calls {
        assert!(text.contains(&format!("+ kubectl {call}")), "every command is printed first: {call}");
    }
    assert!(
        text.contains("Canary passed") && text.contains("kubectl apply -k manifests/overlays/production"),
        "{text}"
    );
    assert!(text.contains("kubectl taint node ip-10-0-1-23 iamlet.io/canary=true:NoSchedule-"), "{text}");
}

#[test]
fn a_failing_canary_shows_logs_rules_and_the_explanation() {
    // The pod came out with the node's own role: exactly what the canary must catch.
    let (code, text, calls) = canary("arn:aws:sts::123456789012:assumed-role/eks-node-role/i-0abc");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Canary FAILED"), "{text}");
    assert!(text.contains("AssumeRole failed"), "iamlet's logs are shown: {text}");
    assert!(calls.iter().any(|c| c.starts_with("-n kube-system logs daemonset/iamlet-canary")));
    assert!(calls.iter().any(
        |c| c.contains("iamlet explain iamlet-canary/aws-iam-tester-canary-6d5f-x7k2") && c.contains("--check-sts")
    ));
    assert!(calls.iter().any(|c| c.contains("iptables-nft-save -t nat")));
    assert!(!text.contains("apply -k manifests/overlays/production"), "no rollout advice on failure");
}

#[test]
fn usage_is_checked() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/canary.sh");
    let output = Command::new("bash").arg(script).arg("only-a-node").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("usage:"));
}
