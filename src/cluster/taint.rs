//! The startup taint (`--startup-taint`, `iamlet.io/agent-not-ready`): nodes register with
//! it, so no application pod is scheduled until iamlet protects the node; iamlet removes it
//! from its own node once its rules are installed and it is ready.
//!
//! Only that taint is removed. The patch is a JSON Patch that first `test`s the taints it
//! read, so a taint added or removed by someone else in between (the cluster autoscaler,
//! Karpenter, a drain) makes the patch fail instead of being overwritten; iamlet then reads
//! the node again and retries.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// The taint iamlet removes by default.
pub const DEFAULT_STARTUP_TAINT: &str = "iamlet.io/agent-not-ready";

/// `taints` without those keyed `key` (any effect), or `None` when there are none. Pure.
pub fn without(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints.iter().filter(|t| t.key != key).cloned().collect();
    (kept.len() != taints.len()).then_some(kept)
}

/// The JSON Patch from `current` to `kept`, valid only while the taints are still `current`.
pub fn patch(current: &[Taint], kept: &[Taint]) -> Result<json_patch::Patch, serde_json::Error> {
    serde_json::from_value(json!([
        {"op": "test", "path": "/spec/taints", "value": current},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]))
}

/// Once `ready` resolves (the node is protected), removes the taint `key` from `node`,
/// retrying (with back-off, forever) until it is gone; returns once it is.
pub async fn remove(client: kube::Client, node: &str, key: &str, ready: impl Future<Output = ()>) {
    ready.await;
    let nodes = Api::<Node>::all(client);
    let mut backoff = Duration::from_millis(200);
    loop {
        match remove_once(&nodes, node, key).await {
            Ok(true) => {
                tracing::info!(node, taint = key, "removed the startup taint: pods may be scheduled on this node");
                return;
            }
            Ok(false) => {
                tracing::debug!(node, taint = key, "the node has no startup taint");
                return;
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::warn!(node, "cannot remove the startup taint: there is no node {node} (check --node)");
                return;
            }
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                tracing::debug!(node, "the node's taints changed while removing the startup taint; retrying");
                continue;
            }
            Err(error) => {
                tracing::warn!(node, taint = key, %error, "cannot remove the startup taint; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One read-and-patch; `Ok(false)` when the taint is not there.
async fn remove_once(nodes: &Api<Node>, node: &str, key: &str) -> Result<bool, kube::Error> {
    let object = nodes.get(node).await?;
    let current = object.spec.and_then(|s| s.taints).unwrap_or_default();
    let Some(kept) = without(&current, key) else { return Ok(false) };
    let patch = patch(&current, &kept).map_err(kube::Error::SerdeError)?;
    nodes.patch(node, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint { key: key.into(), effect: effect.into(), ..Taint::default() }
    }

    #[test]
    fn removes_only_the_startup_taint() {
        let taints = [taint(DEFAULT_STARTUP_TAINT, "NoSchedule"), taint("dedicated", "NoSchedule")];
        assert_eq!(without(&taints, DEFAULT_STARTUP_TAINT).unwrap(), [taint("dedicated", "NoSchedule")]);
        assert!(without(&taints[1..], DEFAULT_STARTUP_TAINT).is_none());
        let both_effects = [taint(DEFAULT_STARTUP_TAINT, "NoSchedule"), taint(DEFAULT_STARTUP_TAINT, "NoExecute")];
        assert!(without(&both_effects, DEFAULT_STARTUP_TAINT).unwrap().is_empty());
    }

    #[test]
    fn the_patch_applies_only_to_the_taints_it_read() {
        let current = vec![taint(DEFAULT_STARTUP_TAINT, "NoSchedule"), taint("dedicated", "NoSchedule")];
        let kept = without(&current, DEFAULT_STARTUP_TAINT).unwrap();
        let patch = patch(&current, &kept).unwrap();
        let mut node = json!({"spec": {"taints": current}});
        json_patch::patch(&mut node, &patch).unwrap();
        assert_eq!(node["spec"]["taints"], json!([{"key": "dedicated", "effect": "NoSchedule"}]));
        let mut changed = json!({"spec": {"taints": [{"key": "new", "effect": "NoSchedule"}]}});
        assert!(json_patch::patch(&mut changed, &patch).is_err(), "a concurrent change fails the test op");
    }
}
