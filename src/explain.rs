//! `iamlet explain <namespace>/<pod>`: which role a pod gets and why, or why not.
//!
//! It answers in one command the checklist the EKS and kube2iam guides walk through by hand
//! (is the pod annotated, what ARN does that make, does the namespace allow it, would STS
//! agree), using the same flags and the same policy code as the agent.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Api;

use crate::cli::FlagError;
use crate::cli::Settings;
use crate::cluster::{AnnotationKeys, NamespaceRules, NamespaceStore, ServiceAccountStore, service_account_role_of};
use crate::credentials::{AwsSts, RoleAssumer};
use crate::imds::UpstreamImds;
use crate::netfilter::binding::BindPodPorts;
use crate::netfilter::coverage::Routes;
use crate::netfilter::{Choice, NetworkSettings, choice};
use crate::pod::PodIdentity;
use crate::policy::{
    Assignment, IRSA_ROLE_ANNOTATION, KIAM_PERMITTED_ANNOTATION, NamespaceRule, RoleSource, ServiceAccountLookup,
};
use crate::ports::Verdict;
use crate::resolve::{CredentialKey, Resolved, Resolver, SessionScope, Unresolved};

/// What `explain` found, line by line, and its verdict.
#[derive(Debug)]
pub struct Explanation {
    pub lines: Vec<(&'static str, String)>,
    /// The role the pod gets, or why it gets none.
    pub verdict: Result<Assignment, String>,
    /// The key its credentials are cached (and its session named) under.
    pub key: Option<CredentialKey>,
}

impl Explanation {
    /// The report, one `label: value` line each, aligned.
    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
        let mut out = String::new();
        for (label, value) in &self.lines {
            let _ = writeln!(out, "{:<width$} {value}", format!("{label}:"));
        }
        out
    }
}

/// Explains `pod` as `resolver` sees it: with restrictions on, its namespace store holds the
/// pod's namespace, whose `namespace_key` annotation is read. Pure.
pub fn explain(pod: &Pod, resolver: &Resolver, keys: &AnnotationKeys, namespace_key: Option<&str>) -> Explanation {
    let mut lines = Vec::new();
    let name =
        format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or("?"), pod.metadata.name.as_deref().unwrap_or("?"));
    lines.push(("pod", name));
    lines.push((
        "node",
        pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| "(not scheduled)".into()),
    ));
    let Some(identity) = crate::cluster::identity(pod, keys) else {
        let reason = "iamlet never serves this pod: it is on the host network or has finished".to_string();
        lines.push(("served", reason.clone()));
        return Explanation { lines, verdict: Err(reason), key: None };
    };
    let ips = identity.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    lines.push(("ips", if ips.is_empty() { "(none yet)".into() } else { ips }));
    lines.push((
        "annotation",
        match &identity.role_annotation {
            Some(value) => format!("{} = {value:?}", keys.role),
            None => format!("{} is not set", keys.role),
        },
    ));
    lines.push(("service account", service_account_line(&identity, resolver, keys)));
    let resolved = resolver.resolve(&identity);
    lines.push(("role", role_line(&identity, &resolved)));
    let rule = resolver.namespace_rule(&identity.namespace);
    lines.push(("namespace", namespace_line(namespace_key, &resolved, rule.as_deref())));
    let (verdict, key) = match resolved {
        Ok(Resolved { assignment, key }) => (Ok(assignment), Some(key)),
        Err(denial) => (Err(denial.to_string()), None),
    };
    if let Some(key) = &key {
        lines.push((
            "external id",
            key.external_id.as_deref().map(|id| format!("{id:?}")).unwrap_or_else(|| "(none)".into()),
        ));
        lines.push(("session name", key.session_name.to_string()));
        lines.push((
            "session scope",
            match key.scope {
                SessionScope::Pod => "pod (the session is this pod's alone)".to_string(),
                scope => format!(
                    "{scope} (shared with the node's other pods of this role{}; the audit log names each pod)",
                    match scope {
                        SessionScope::ServiceAccount => " and ServiceAccount",
                        _ => "",
                    }
                ),
            },
        ));
        if let Some(tags) = &key.tags {
            let tags: Vec<String> = tags.iter().map(|tag| format!("{}={}", tag.key, tag.value)).collect();
            lines.push((
                "session tags",
                format!("{} (transitive; the role's trust policy must allow sts:TagSession)", tags.join(", ")),
            ));
        }
        if let Some(identity) = &key.source_identity {
            lines.push((
                "source identity",
                format!("{identity} (the role's trust policy must allow sts:SetSourceIdentity)"),
            ));
        }
    }
    Explanation { lines, verdict, key }
}

/// What the pod's ServiceAccount names, and whether it counts.
fn service_account_line(pod: &PodIdentity, resolver: &Resolver, keys: &AnnotationKeys) -> String {
    let name = format!("{}/{}", pod.namespace, pod.service_account);
    if !resolver.consults_service_accounts() {
        return format!("{name}: not consulted (--service-account-roles is off)");
    }
    let named = match resolver.service_account_role(&pod.namespace, &pod.service_account) {
        None => return format!("{name}: not known yet"),
        Some(said) => match said.as_lookup() {
            ServiceAccountLookup::Role(role) => format!("{name}: {} = {:?}", role.annotation, role.value),
            _ => format!("{name}: names no role (neither {} nor {IRSA_ROLE_ANNOTATION} is set)", keys.role),
        },
    };
    match pod.own_role() {
        Some(_) => format!("{named}; not used: the pod's own annotation comes first"),
        None => named,
    }
}

/// The role the pod gets and where it comes from, or why none.
fn role_line(pod: &PodIdentity, resolved: &Result<Resolved, Unresolved>) -> String {
    match resolved {
        Ok(Resolved { assignment, .. }) => {
            let source = match &assignment.source {
                RoleSource::Annotation => "from the pod's annotation".to_string(),
                RoleSource::ServiceAccount { annotation } => {
                    format!("from ServiceAccount {}/{}'s {annotation}", pod.namespace, pod.service_account)
                }
                RoleSource::DefaultRole => "the default role (--default-role)".to_string(),
            };
            format!("{} ({source})", assignment.role)
        }
        Err(denial) => format!("none: {denial}"),
    }
}

/// What the namespace's allow-list says of the pod's role.
fn namespace_line(
    namespace_key: Option<&str>,
    resolved: &Result<Resolved, Unresolved>,
    rule: Option<&NamespaceRule>,
) -> String {
    match (namespace_key, resolved) {
        (None, _) => "restrictions off (--namespace-restrictions not set)".into(),
        (Some(annotation), Ok(Resolved { assignment, .. })) => {
            format!("allowed by {:?} in {annotation}", assignment.allowed_by.as_deref().unwrap_or_default())
        }
        (Some(annotation), Err(_)) => match rule {
            Some(Ok(allowed)) => {
                let sources: Vec<&str> = allowed.entries.iter().map(|e| e.source.as_str()).collect();
                if sources.iter().any(|source| source.starts_with(KIAM_PERMITTED_ANNOTATION)) {
                    format!("the namespace allows only {sources:?}")
                } else {
                    format!("{annotation} lists {sources:?}")
                }
            }
            Some(Err(error)) => format!("{annotation} or {KIAM_PERMITTED_ANNOTATION} is malformed: {error}"),
            None => format!("neither {annotation} nor {KIAM_PERMITTED_ANNOTATION} is set: no role is allowed"),
        },
    }
}

/// Parses `namespace/name`.
pub fn parse_target(target: &str) -> Result<(&str, &str), FlagError> {
    match target.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => Err(FlagError { flag: "<namespace>/<pod>", message: format!("{target:?} is not namespace/pod") }),
    }
}

/// Runs `iamlet explain` with the agent's `settings`, on `node` when known: prints the
/// report; true when the pod gets a role (and, with `check_sts`, STS agreed).
pub async fn run(settings: &Settings, node: Option<&str>, target: &str, check_sts: bool) -> anyhow::Result<bool> {
    let (namespace, name) = parse_target(target)?;
    let client = crate::cluster::client::client(&settings.kube).await?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read pod {namespace}/{name}: {e}"))?;
    let sts = AwsSts::from_environment(&settings.sts.client(node.unwrap_or("explain"))).await;
    let policy = &settings.policy;
    let keys = AnnotationKeys::of(policy);
    let service_account = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
    // A `role` scope's session names the node whose agent serves the pod.
    let pod_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).or(node).unwrap_or("(not scheduled)");
    let resolver = resolver(settings, client, (namespace, service_account), pod_node, &keys, &sts).await?;
    let namespace_key = policy.namespace_restrictions.map(|_| policy.namespace_key.as_str());
    let mut explanation = explain(&pod, &resolver, &keys, namespace_key);
    let mut ok = explanation.verdict.is_ok();
    if check_sts && let Some(key) = explanation.key.clone() {
        let line = match sts.assume_role(&key, settings.sts.iam_role_session_ttl.duration()).await {
            Ok(credentials) => format!(
                "AssumeRole succeeded; credentials valid until {}",
                humantime::format_rfc3339_seconds(credentials.expiration)
            ),
            Err(error) => {
                ok = false;
                format!("AssumeRole failed: {error}")
            }
        };
        explanation.lines.push(("sts", line));
    }
    if let Some(line) = interception(&settings.network, node, &pod).await {
        explanation.lines.push(("interface", line));
    }
    if let Some(line) = port_binding(&settings.network, node, &pod) {
        explanation.lines.push(("port", line));
    }
    explanation.lines.push((
        "verdict",
        match &explanation.verdict {
            Ok(assignment) if ok => format!("the pod gets {}", assignment.role),
            Ok(assignment) => format!("the pod is assigned {} but STS refuses it", assignment.role),
            Err(reason) => format!("the pod gets no credentials: {reason}"),
        },
    ));
    print!("{}", explanation.render());
    Ok(ok)
}

/// The agent's resolver, as it stands for a pod of `namespace` running as `service_account`:
/// the policy discovered as the agent discovers it, with restrictions on, that namespace's
/// allow-list, and with `--service-account-roles`, that ServiceAccount's role.
async fn resolver(
    settings: &Settings,
    client: kube::Client,
    (namespace, service_account): (&str, &str),
    node: &str,
    keys: &AnnotationKeys,
    sts: &AwsSts,
) -> anyhow::Result<Resolver> {
    let upstream = UpstreamImds::new(settings.imds.metadata_addr.clone(), Duration::from_secs(2));
    let caller: Arc<dyn RoleAssumer> = Arc::new(sts.clone());
    let policy = crate::policy::discover(&settings.policy, &upstream, &caller).await?;
    let namespaces = match NamespaceRules::configured(&settings.policy, &policy) {
        Some(rules) => {
            let object = Api::<Namespace>::all(client.clone())
                .get(namespace)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read namespace {namespace}: {e}"))?;
            let store = NamespaceStore::new();
            store.replace_all(rules.rule_of(&object).map(|rule| (namespace.to_string(), rule)));
            Some(store)
        }
        None => None,
    };
    let service_accounts = match settings.policy.service_account_roles {
        true => {
            let object =
                Api::<ServiceAccount>::namespaced(client, namespace)
                    .get_metadata_opt(service_account)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read ServiceAccount {namespace}/{service_account}: {e}"))?;
            let role = object.and_then(|object| service_account_role_of(&object.metadata, keys));
            let store = ServiceAccountStore::new();
            store.replace_all(role.map(|role| ((namespace.to_string(), service_account.to_string()), role)));
            Some(store)
        }
        false => None,
    };
    let sessions = settings.sts.sessions.clone();
    Ok(Resolver::configured(Arc::new(policy), sessions, node, namespaces, service_accounts))
}

/// Whether the pod's metadata traffic reaches iamlet: which interface the kernel routes its
/// IP through, and whether the agent's `--host-interface` covers it. Only on the pod's own
/// node (`--node`/`NODE_NAME`, as in `kubectl exec ds/iamlet -- iamlet explain ...`).
async fn interception(config: &NetworkSettings, node: Option<&str>, pod: &Pod) -> Option<String> {
    let pod_node = pod.spec.as_ref()?.node_name.as_deref()?;
    if Some(pod_node) != node {
        return Some(format!("not checked: run explain on node {pod_node} (kubectl exec into its iamlet pod)"));
    }
    let interfaces = match choice::look(&config.host_interface, &config.cni_conf_dir, &crate::netfilter::node_links()) {
        Choice::Found { interfaces, .. } => interfaces,
        Choice::Waiting { why, .. } => return Some(format!("not intercepted yet: {why}")),
    };
    let routes = match Routes::open() {
        Ok(routes) => routes,
        Err(error) => return Some(format!("not checked: {error}")),
    };
    let status = pod.status.as_ref();
    let ips = status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|ip| ip.ip.clone());
    let mut lines = Vec::new();
    for ip in ips.chain(status.and_then(|s| s.pod_ip.clone())).filter_map(|ip| ip.parse().ok()) {
        let line = match routes.interface_to(ip).await {
            Ok(link) if interfaces.matches(&link) => {
                format!("{ip} via {link}: covered by --host-interface {interfaces}")
            }
            Ok(link) => format!(
                "{ip} via {link}: NOT covered by --host-interface {interfaces}: this pod reaches the node's metadata service directly"
            ),
            Err(error) => format!("{ip}: {error}"),
        };
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    (!lines.is_empty()).then(|| lines.join("; "))
}

/// Which port the CNI's records bind each of the pod's addresses to (`--bind-pod-ports`), as
/// the agent on the pod's node would check it.
fn port_binding(config: &NetworkSettings, node: Option<&str>, pod: &Pod) -> Option<String> {
    let binding = &config.binding;
    if binding.bind_pod_ports == BindPodPorts::Never || !config.iptables {
        return None;
    }
    let pod_node = pod.spec.as_ref()?.node_name.as_deref()?;
    if Some(pod_node) != node {
        return Some(format!("not checked: run explain on node {pod_node} (kubectl exec into its iamlet pod)"));
    }
    let read = match crate::ports::records::read(&binding.cni_results_dir) {
        Ok(read) => read,
        Err(error) => return Some(format!("not checked: {}: {error}", binding.cni_results_dir.display())),
    };
    let meta = &pod.metadata;
    let (namespace, name, uid) = (
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or(""),
        meta.uid.as_deref().unwrap_or(""),
    );
    let status = pod.status.as_ref();
    let ips = status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|ip| ip.ip.clone());
    let mut lines = Vec::new();
    for ip in ips.chain(status.and_then(|s| s.pod_ip.clone())).filter_map(|ip| ip.parse::<std::net::IpAddr>().ok()) {
        let line = match (read.index.verdict(&ip, namespace, name, uid), read.index.owner(&ip)) {
            (Verdict::Bound, Some(owner)) => format!("{ip} bound to port {} by the CNI's record", owner.port),
            (Verdict::Bound, None) => format!("{ip} bound"),
            (Verdict::Unbound(why), _) => format!("{ip} NOT bound, so refused: {why}"),
        };
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    (!lines.is_empty()).then(|| lines.join("; "))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::{Policy, RestrictionFormat};

    fn policy() -> Policy {
        crate::policy::test_policy(None)
    }

    fn resolver(policy: Policy) -> Resolver {
        Resolver::new(Arc::new(policy))
    }

    /// The report with each run of spaces made one, so expectations do not depend on the
    /// alignment.
    fn plain(report: &Explanation) -> String {
        report
            .render()
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A resolver with glob restrictions on, in the node's account, whose namespace `shop`
    /// carries `annotations`.
    fn restricted_resolver(annotations: serde_json::Value) -> Resolver {
        let mut restricted = policy();
        restricted.restrictions = Some(RestrictionFormat::Glob);
        let rules = NamespaceRules {
            annotation: "iam.amazonaws.com/allowed-roles".into(),
            format: RestrictionFormat::Glob,
            base: restricted.base.clone(),
            account: Some("123456789012".into()),
        };
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop", "annotations": annotations}})).unwrap();
        let store = NamespaceStore::new();
        store.replace_all(rules.rule_of(&ns).map(|rule| ("shop".to_string(), rule)));
        resolver(restricted).with_namespaces(store)
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.5"}
        }))
        .unwrap()
    }

    #[test]
    fn explains_an_annotated_pod() {
        let report = explain(
            &pod(json!({"iam.amazonaws.com/role": "app", "iam.amazonaws.com/external-id": "x-1"})),
            &resolver(policy()),
            &AnnotationKeys::default(),
            None,
        );
        assert!(report.verdict.is_ok());
        let text = plain(&report);
        for expected in [
            "pod: shop/web",
            "node: node-a",
            "ips: 10.0.0.5",
            "annotation: iam.amazonaws.com/role = \"app\"",
            "service account: shop/default: not consulted (--service-account-roles is off)",
            "role: arn:aws:iam::123456789012:role/app (from the pod's annotation)",
            "namespace: restrictions off",
            "external id: \"x-1\"",
            "session name: shop.web",
            "session scope: pod (the session is this pod's alone)",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        let shared = explain(
            &pod(json!({"iam.amazonaws.com/role": "app"})),
            &resolver(policy()).with_scope(SessionScope::Role, "node-a"),
            &AnnotationKeys::default(),
            None,
        );
        let text = plain(&shared);
        assert!(text.contains("session name: iamlet@node-a"), "{text}");
        assert!(text.contains("session scope: role (shared with the node's other pods of this role;"), "{text}");
    }

    #[test]
    fn explains_why_not() {
        let report = explain(&pod(json!({})), &resolver(policy()), &AnnotationKeys::default(), None);
        assert!(report.verdict.unwrap_err().contains("no role annotation"));

        let restricted = restricted_resolver(json!({"iam.amazonaws.com/allowed-roles": "[\"batch-*\"]"}));
        let report = explain(
            &pod(json!({"iam.amazonaws.com/role": "app"})),
            &restricted,
            &AnnotationKeys::default(),
            Some("iam.amazonaws.com/allowed-roles"),
        );
        assert!(report.verdict.is_err());
        assert!(
            plain(&report).contains("namespace: iam.amazonaws.com/allowed-roles lists [\"batch-*\"]"),
            "{}",
            report.render()
        );
    }

    #[test]
    fn names_kiams_permitted_expression_when_it_is_what_the_namespace_has() {
        let restricted = restricted_resolver(json!({"iam.amazonaws.com/permitted": "batch-.*"}));
        let pod = pod(json!({"iam.amazonaws.com/role": "app"}));
        let report = explain(&pod, &restricted, &AnnotationKeys::default(), Some("iam.amazonaws.com/allowed-roles"));
        let text = plain(&report);
        assert!(
            text.contains("namespace: the namespace allows only [\"iam.amazonaws.com/permitted: batch-.*\"]"),
            "{text}"
        );
    }

    #[test]
    fn names_the_service_account_a_role_comes_from() {
        let store = ServiceAccountStore::new();
        let irsa = crate::policy::ServiceAccountRole {
            annotation: IRSA_ROLE_ANNOTATION.into(),
            value: "arn:aws:iam::123456789012:role/web-irsa".into(),
            external_id: None,
        };
        store.replace_all([(("shop".to_string(), "web-sa".to_string()), irsa)]);
        let resolver = resolver(policy()).with_service_accounts(store);
        let mut unannotated = pod(json!({}));
        unannotated.spec.as_mut().unwrap().service_account_name = Some("web-sa".into());
        let report = explain(&unannotated, &resolver, &AnnotationKeys::default(), None);
        let text = plain(&report);
        for expected in [
            "annotation: iam.amazonaws.com/role is not set",
            "service account: shop/web-sa: eks.amazonaws.com/role-arn = \"arn:aws:iam::123456789012:role/web-irsa\"",
            "role: arn:aws:iam::123456789012:role/web-irsa (from ServiceAccount shop/web-sa's eks.amazonaws.com/role-arn)",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        let mut annotated = unannotated.clone();
        annotated.metadata.annotations = Some([("iam.amazonaws.com/role".to_string(), "own".to_string())].into());
        let text = plain(&explain(&annotated, &resolver, &AnnotationKeys::default(), None));
        assert!(text.contains("not used: the pod's own annotation comes first"), "{text}");
        assert!(text.contains("role/own (from the pod's annotation)"), "{text}");
        unannotated.spec.as_mut().unwrap().service_account_name = Some("other".into());
        let report = explain(&unannotated, &resolver, &AnnotationKeys::default(), None);
        assert!(plain(&report).contains("shop/other: names no role"), "{}", report.render());
        assert!(report.verdict.unwrap_err().contains("neither the pod nor its ServiceAccount shop/other"));
    }

    #[test]
    fn targets_are_namespace_slash_pod() {
        assert_eq!(parse_target("shop/web").unwrap(), ("shop", "web"));
        for bad in ["web", "/web", "shop/", "a/b/c"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
