//! From a pod object to the [`PodIdentity`] iamlet keeps of it.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use crate::pod::PodIdentity;

/// The annotation keys policy reads; everything else on a pod is dropped.
#[derive(Debug, Clone)]
pub struct AnnotationKeys {
    pub role: String,
    pub external_id: String,
}

impl Default for AnnotationKeys {
    /// kube2iam's keys, the defaults of `--iam-role-key` and `--iam-external-id`.
    fn default() -> Self {
        Self { role: "iam.amazonaws.com/role".into(), external_id: "iam.amazonaws.com/external-id".into() }
    }
}

impl AnnotationKeys {
    /// `--iam-role-key` and `--iam-external-id`.
    pub fn of(settings: &crate::policy::PolicySettings) -> Self {
        Self { role: settings.iam_role_key.clone(), external_id: settings.iam_external_id.clone() }
    }
}

/// The identity of a pod that may be served, or `None` for a pod that never is: one on the
/// host network (its IP is the node's), one that has finished (Succeeded or Failed, whose IP
/// may already belong to another pod), or one without a uid.
pub fn identity(pod: &Pod, keys: &AnnotationKeys) -> Option<PodIdentity> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|list| list.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).map(|v| v.trim().to_string());
    Some(PodIdentity {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid,
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        ips,
        role_annotation: annotation(&keys.role),
        external_id: annotation(&keys.external_id),
        created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
        terminating: meta.deletion_timestamp.is_some(),
        stopped: status.and_then(|s| s.container_statuses.as_deref()).is_some_and(|all| {
            !all.is_empty() && all.iter().all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
        }),
        running: phase == Some("Running"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn keeps_the_fields_that_decide_the_role() {
        let identity = identity(
            &pod(json!({
                "metadata": {"name": "web", "namespace": "shop", "uid": "u1",
                    "creationTimestamp": "2026-01-01T00:00:10Z",
                    "annotations": {"iam.amazonaws.com/role": " app ", "iam.amazonaws.com/external-id": "x1",
                                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
                "spec": {"containers": [], "serviceAccountName": "web-sa"},
                "status": {"phase": "Running", "podIP": "10.0.0.5",
                           "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
            })),
            &AnnotationKeys::default(),
        )
        .unwrap();
        assert_eq!(identity.qualified_name(), "shop/web");
        assert_eq!(identity.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert_eq!(identity.role_annotation.as_deref(), Some("app"));
        assert_eq!(identity.external_id.as_deref(), Some("x1"));
        assert_eq!(identity.service_account, "web-sa");
        assert!(identity.running && !identity.terminating);
        assert_eq!(identity.created, 1767225610);
    }

    #[test]
    fn a_terminating_pod_with_every_container_stopped_releases_its_ip() {
        let status = |states: serde_json::Value| {
            pod(
                json!({"metadata": {"name": "a", "namespace": "n", "uid": "u", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                       "status": {"phase": "Running", "podIP": "10.0.0.9", "containerStatuses": states}}),
            )
        };
        let terminated = json!({"terminated": {"exitCode": 0}});
        let running = json!({"running": {}});
        let stopped = identity(
            &status(json!([{"name": "a", "state": terminated}, {"name": "b", "state": terminated}])),
            &AnnotationKeys::default(),
        )
        .unwrap();
        assert!(stopped.stopped && !stopped.owns_its_ips());
        let draining = identity(
            &status(json!([{"name": "a", "state": terminated}, {"name": "b", "state": running}])),
            &AnnotationKeys::default(),
        )
        .unwrap();
        assert!(!draining.stopped && draining.owns_its_ips(), "graceful shutdown needs credentials");
        assert!(identity(&status(json!([])), &AnnotationKeys::default()).unwrap().owns_its_ips());
    }

    #[test]
    fn falls_back_to_pod_ip() {
        let identity = identity(
            &pod(json!({"metadata": {"name": "a", "namespace": "n", "uid": "u"},
                         "status": {"phase": "Pending", "podIP": "10.0.0.9"}})),
            &AnnotationKeys::default(),
        )
        .unwrap();
        assert_eq!(identity.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(!identity.running);
    }

    #[test]
    fn never_indexes_host_network_or_finished_pods() {
        for value in [
            json!({"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "spec": {"containers": [], "hostNetwork": true},
                   "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
            json!({"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "status": {"phase": "Succeeded", "podIP": "10.0.0.1"}}),
            json!({"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "status": {"phase": "Failed", "podIP": "10.0.0.1"}}),
            json!({"metadata": {"name": "a", "namespace": "n"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
        ] {
            assert!(identity(&pod(value.clone()), &AnnotationKeys::default()).is_none(), "{value}");
        }
    }
}
