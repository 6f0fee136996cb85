//! Whether a successor will run on this node: the agent's own pod, its DaemonSet, and whether
//! that DaemonSet still runs on the node. Asked at shutdown under `--iptables-keep-on-exit=auto`.
//!
//! The agent knows its pod from the downward API (`POD_NAMESPACE`, `POD_NAME`) and its
//! DaemonSet from the pod's controller ownerReference, looked up at startup (when the pod
//! surely exists) and again at shutdown if that failed. Whether the DaemonSet runs here is
//! decided as its controller decides where to create pods: the node selector, required node
//! affinity, and the node's NoSchedule and NoExecute taints against the pod's tolerations
//! (with the tolerations the controller adds to every daemon pod).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration};
use kube::Api;

/// What the cluster says about this agent's future on the node (asked only under `auto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A DaemonSet runs the agent and will run a successor here: this is a restart.
    Replaced { daemonset: String },
    /// No successor will come: the DaemonSet is gone, being deleted, no longer selects this
    /// node, or the agent was not started by a DaemonSet at all.
    Removed { reason: String },
    /// The cluster could not be asked.
    Unknown { error: String },
}

/// How long shutdown waits for the API server before failing closed.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's own pod, from the downward API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfPod {
    pub namespace: String,
    pub name: String,
}

impl SelfPod {
    /// From `POD_NAMESPACE` and `POD_NAME`; `None` when either is unset (not run as a pod).
    pub fn from_env() -> Option<Self> {
        let get = |key| std::env::var(key).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Some(Self { namespace: get("POD_NAMESPACE")?, name: get("POD_NAME")? })
    }
}

/// What runs the agent's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Controller {
    /// A DaemonSet, in the pod's namespace.
    DaemonSet { namespace: String, name: String },
    /// Anything else (a bare pod, a Deployment...): no successor is promised.
    Other(String),
}

/// Finds the controller of `pod`.
pub async fn controller(client: &kube::Client, pod: &SelfPod) -> Result<Controller, kube::Error> {
    let object = Api::<Pod>::namespaced(client.clone(), &pod.namespace).get(&pod.name).await?;
    Ok(controller_of(&object, &pod.namespace))
}

/// The controller ownerReference of a pod, as a [`Controller`]. Pure.
pub fn controller_of(pod: &Pod, namespace: &str) -> Controller {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    match owners.iter().find(|o| o.controller == Some(true)) {
        Some(owner) if owner.kind == "DaemonSet" && owner.api_version.starts_with("apps/") => {
            Controller::DaemonSet { namespace: namespace.to_string(), name: owner.name.clone() }
        }
        Some(owner) => Controller::Other(format!("the pod is run by {} {}, not a DaemonSet", owner.kind, owner.name)),
        None => Controller::Other("the pod has no controller (not run by a DaemonSet)".into()),
    }
}

/// Whether a successor will run on `node`, given the agent's pod (`None`: not run as a pod)
/// and its controller if already known. Bounded by [`ASK_TIMEOUT`].
pub async fn placement(
    client: &kube::Client,
    pod: Option<&SelfPod>,
    known: Option<Controller>,
    node: &str,
) -> Placement {
    let Some(pod) = pod else {
        return Placement::Removed {
            reason: "not run as a DaemonSet's pod (POD_NAME and POD_NAMESPACE are unset)".into(),
        };
    };
    let ask = async {
        let controller = match known {
            Some(controller) => controller,
            None => {
                controller(client, pod).await.map_err(|e| format!("reading pod {}/{}: {e}", pod.namespace, pod.name))?
            }
        };
        let (namespace, name) = match controller {
            Controller::DaemonSet { namespace, name } => (namespace, name),
            Controller::Other(reason) => return Ok(Placement::Removed { reason }),
        };
        let qualified = format!("{namespace}/{name}");
        let daemonset = match Api::<DaemonSet>::namespaced(client.clone(), &namespace).get_opt(&name).await {
            Ok(Some(daemonset)) => daemonset,
            Ok(None) => return Ok(Placement::Removed { reason: format!("DaemonSet {qualified} is gone (uninstall)") }),
            Err(e) => return Err(format!("reading DaemonSet {qualified}: {e}")),
        };
        if daemonset.metadata.deletion_timestamp.is_some() {
            return Ok(Placement::Removed { reason: format!("DaemonSet {qualified} is being deleted (uninstall)") });
        }
        let node_object =
            Api::<Node>::all(client.clone()).get(node).await.map_err(|e| format!("reading node {node}: {e}"))?;
        Ok(match runs_on(&daemonset, &node_object) {
            Ok(()) => Placement::Replaced { daemonset: qualified },
            Err(why) => {
                Placement::Removed { reason: format!("DaemonSet {qualified} no longer runs on this node: {why}") }
            }
        })
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask).await {
        Ok(Ok(placement)) => placement,
        Ok(Err(error)) => Placement::Unknown { error },
        Err(_) => Placement::Unknown { error: format!("the API server did not answer in {}s", ASK_TIMEOUT.as_secs()) },
    }
}

/// Whether `daemonset`'s controller would run a pod on `node`; `Err` says why not. Pure.
pub fn runs_on(daemonset: &DaemonSet, node: &Node) -> Result<(), String> {
    let template = daemonset.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let Some(template) = template else { return Err("the DaemonSet has no pod template".into()) };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let node_name = node.metadata.name.as_deref().unwrap_or_default();
    for (key, value) in template.node_selector.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Err(format!("its nodeSelector needs {key}={value}"));
        }
    }
    let required = template
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    if let Some(required) = required
        && !required.node_selector_terms.iter().any(|term| term_matches(term, labels, node_name))
    {
        return Err("its required node affinity does not match the node".into());
    }
    let mut tolerations = template.tolerations.clone().unwrap_or_default();
    tolerations.extend(daemon_tolerations(template.host_network.unwrap_or(false)));
    for taint in node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default() {
        let blocks = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if blocks && !tolerations.iter().any(|t| tolerates(t, taint)) {
            return Err(format!("the node's taint {}:{} is not tolerated", taint.key, taint.effect));
        }
    }
    Ok(())
}

/// A node selector term: every expression holds (an empty term matches nothing).
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, node_name: &str) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let field = |r: &NodeSelectorRequirement| (r.key == "metadata.name").then_some(node_name);
    expressions.iter().all(|r| requirement_holds(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| field(r).is_some() && requirement_holds(r, field(r)))
}

fn requirement_holds(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |text: &str| text.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v > x),
        "Lt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v < x),
        _ => false,
    }
}

fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
        }
    }
}

/// The tolerations the DaemonSet controller gives every daemon pod.
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let mut list = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        list.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    list.into_iter()
        .map(|(key, effect)| Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some(effect.into()),
            ..Toleration::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn daemonset(template_spec: serde_json::Value) -> DaemonSet {
        serde_json::from_value(json!({"metadata": {"name": "iamlet", "namespace": "kube-system"},
            "spec": {"selector": {}, "template": {"spec": template_spec}}}))
        .unwrap()
    }

    fn node(labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": labels}, "spec": {"taints": taints}}))
            .unwrap()
    }

    fn containers() -> serde_json::Value {
        json!([{"name": "iamlet"}])
    }

    #[test]
    fn node_selector_decides() {
        let canary = daemonset(json!({"containers": containers(), "nodeSelector": {"iamlet.io/canary": "true"}}));
        assert!(runs_on(&canary, &node(json!({"iamlet.io/canary": "true"}), json!([]))).is_ok());
        let error = runs_on(&canary, &node(json!({}), json!([]))).unwrap_err();
        assert!(error.contains("iamlet.io/canary=true"), "{error}");
    }

    #[test]
    fn required_node_affinity_decides() {
        let ds = daemonset(json!({"containers": containers(), "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                                      {"key": "eks.amazonaws.com/compute-type", "operator": "DoesNotExist"}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]}]}}}}));
        assert!(runs_on(&ds, &node(json!({"kubernetes.io/os": "linux"}), json!([]))).is_ok());
        assert!(runs_on(&ds, &node(json!({"kubernetes.io/os": "windows"}), json!([]))).is_ok(), "the name term");
        let fargate: Node = serde_json::from_value(json!({"metadata": {"name": "fargate-1",
            "labels": {"kubernetes.io/os": "linux", "eks.amazonaws.com/compute-type": "fargate"}}}))
        .unwrap();
        assert!(runs_on(&ds, &fargate).is_err());
        let gt = NodeSelectorRequirement { key: "n".into(), operator: "Gt".into(), values: Some(vec!["3".into()]) };
        assert!(
            requirement_holds(&gt, Some("4")) && !requirement_holds(&gt, Some("3")) && !requirement_holds(&gt, None)
        );
    }

    #[test]
    fn untolerated_blocking_taints_decide() {
        let tolerate_all = daemonset(json!({"containers": containers(), "tolerations": [{"operator": "Exists"}]}));
        let tainted = node(json!({}), json!([{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}]));
        assert!(runs_on(&tolerate_all, &tainted).is_ok());
        let picky = daemonset(json!({"containers": containers(),
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoExecute"}]}));
        assert!(runs_on(&picky, &tainted).unwrap_err().contains("dedicated:NoExecute"));
        let soft = node(json!({}), json!([{"key": "dedicated", "value": "gpu", "effect": "PreferNoSchedule"}]));
        assert!(runs_on(&picky, &soft).is_ok(), "PreferNoSchedule never blocks");
        let cordoned = node(json!({}), json!([{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]));
        assert!(runs_on(&picky, &cordoned).is_ok(), "daemon pods tolerate cordons");
    }

    #[test]
    fn finds_the_daemonset_among_the_owners() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "iamlet-x", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "iamlet", "uid": "u", "controller": true}]}}))
        .unwrap();
        assert_eq!(
            controller_of(&pod, "kube-system"),
            Controller::DaemonSet { namespace: "kube-system".into(), name: "iamlet".into() }
        );
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "iamlet-x"}})).unwrap();
        assert!(matches!(controller_of(&bare, "kube-system"), Controller::Other(_)));
    }
}
