//! `--host-interface=auto`: which interfaces the node's CNI puts pods behind.
//!
//! Links alone are a poor guide: Calico's `cali*`, the AWS VPC CNI's `eni*` and flannel's
//! `cni0` appear only once the first pod starts, and a `docker0` left by the AMI says nothing
//! about where pods are. So the CNI configuration comes first — the file the kubelet's runtime
//! reads (`--cni-conf-dir`, the lexically first `.conf`, `.conflist` or `.json`) names the
//! plugin — and links are consulted only on a node that has no configuration at all. When
//! neither says anything yet, the answer is "wait", never a guess.

use std::path::Path;

use serde_json::Value;

use super::interfaces::InterfaceMatch;

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// The CNI, where that was read from, and the interfaces its pods sit behind.
    Found { cni: &'static str, from: String, interfaces: InterfaceMatch },
    /// Nothing to go on yet (a new node before its CNI): what iamlet waits for.
    Waiting(String),
}

/// Plugin types and the interfaces their pods' traffic arrives on. A `None` pattern means
/// "the bridge the configuration names" (`bridge`, flannel's `delegate.bridge`), `cni0` by default.
const PLUGINS: &[(&str, &str, Option<&str>)] = &[
    ("calico", "Calico", Some("cali+")),
    ("aws-cni", "AWS VPC CNI", Some("eni+,vlan+")),
    ("cilium-cni", "Cilium", Some("lxc+")),
    ("weave-net", "Weave Net", Some("weave")),
    ("antrea", "Antrea", Some("antrea-gw0")),
    ("ptp", "ptp (kindnet)", Some("veth+")),
    ("flannel", "flannel", None),
    ("bridge", "bridge CNI", None),
];

/// Links that identify a CNI on a node with no CNI configuration, in the order tried.
/// `docker0` is deliberately absent: Docker's bridge never carries pods on Kubernetes 1.24+.
const LINKS: &[(&str, &str, &str)] = &[
    ("Calico", "cali", "cali+"),
    ("AWS VPC CNI", "eni", "eni+,vlan+"),
    ("Cilium", "lxc", "lxc+"),
    ("Weave Net", "weave", "weave"),
    ("kube-router", "kube-bridge", "kube-bridge"),
    ("flannel / bridge CNI", "cni0", "cni0"),
];

/// The per-CNI values, for messages that tell the operator what to set.
pub fn cni_table() -> String {
    "Calico: cali+, AWS VPC CNI: eni+,vlan+, Cilium: lxc+, Weave Net: weave, kube-router: kube-bridge, \
     flannel / bridge CNI: cni0, Antrea: antrea-gw0"
        .into()
}

/// Detects the pod interfaces from the configuration in `conf_dir`, or from `links` when that
/// directory holds no configuration.
pub fn detect(conf_dir: &Path, links: &[String]) -> Detection {
    let configs = read_configs(conf_dir);
    if configs.is_empty() {
        return from_links(links).unwrap_or_else(|| {
            Detection::Waiting(format!(
                "no CNI configuration in {} and no CNI interface among the links ({}); \
                 the CNI is not installed yet, or set --host-interface ({})",
                conf_dir.display(),
                links.join(", "),
                cni_table()
            ))
        });
    }
    let mut unknown = Vec::new();
    for (file, json) in &configs {
        match from_config(json) {
            Some(Ok((cni, interfaces))) => {
                return Detection::Found { cni, from: format!("{}/{file}", conf_dir.display()), interfaces };
            }
            Some(Err(plugin)) => unknown.push(format!("{file}: plugin {plugin:?}")),
            None => unknown.push(format!("{file}: not a CNI configuration")),
        }
    }
    Detection::Waiting(format!(
        "the CNI configuration names no plugin iamlet knows ({}); set --host-interface ({})",
        unknown.join("; "),
        cni_table()
    ))
}

/// The CNI of one configuration (a `.conf` or a `.conflist`): `Some(Ok)` for a known plugin,
/// `Some(Err(type))` for an unknown one, `None` when it is not a CNI configuration. A meta
/// plugin (Multus) is looked through to its first delegate; without one it is skipped, like
/// a configuration that does not parse.
pub fn from_config(config: &Value) -> Option<Result<(&'static str, InterfaceMatch), String>> {
    let plugin = match config.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins.first()?,
        None => config,
    };
    let kind = plugin.get("type")?.as_str()?;
    if kind.starts_with("multus") {
        return from_config(plugin.get("delegates")?.as_array()?.first()?);
    }
    let Some((_, cni, pattern)) = PLUGINS.iter().find(|(name, _, _)| *name == kind) else {
        return Some(Err(kind.to_string()));
    };
    let bridge = || {
        let named = plugin.get("bridge").or_else(|| plugin.get("delegate")?.get("bridge"));
        named.and_then(Value::as_str).unwrap_or("cni0").to_string()
    };
    let text = pattern.map(str::to_string).unwrap_or_else(bridge);
    Some(InterfaceMatch::parse(&text).map(|interfaces| (*cni, interfaces)).map_err(|_| format!("{kind} ({text})")))
}

/// What the CNI configuration alone says (`auto`'s answer on a node without links yet):
/// the CNI, the file, and its pods' interfaces; `None` without a configuration iamlet knows.
pub fn configured(conf_dir: &Path) -> Option<(&'static str, String, InterfaceMatch)> {
    match detect(conf_dir, &[]) {
        Detection::Found { cni, from, interfaces } => Some((cni, from, interfaces)),
        Detection::Waiting(_) => None,
    }
}

fn from_links(links: &[String]) -> Option<Detection> {
    LINKS.iter().find_map(|(cni, prefix, pattern)| {
        links.iter().any(|link| link.starts_with(prefix)).then(|| Detection::Found {
            cni,
            from: format!("the node's links (no CNI configuration; a {prefix}* link)"),
            interfaces: InterfaceMatch::parse(pattern).expect("the table's patterns are valid"),
        })
    })
}

/// The configurations in `dir`, in the order the runtime tries them (lexical, as libcni).
/// Files that cannot be read or parsed are skipped, as the runtime skips them.
fn read_configs(dir: &Path) -> Vec<(String, Value)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| [".conf", ".conflist", ".json"].iter().any(|ext| name.ends_with(ext)))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let text = std::fs::read(dir.join(&name)).ok()?;
            Some((name, serde_json::from_slice(&text).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn links(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn found(detection: &Detection) -> (String, &'static str) {
        match detection {
            Detection::Found { interfaces, cni, .. } => (interfaces.to_string(), *cni),
            Detection::Waiting(why) => panic!("waiting: {why}"),
        }
    }

    fn dir_with(files: &[(&str, Value)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, json) in files {
            std::fs::write(dir.path().join(name), json.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn reads_the_plugin_of_each_common_cni() {
        let cases = [
            (
                json!({"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [{"type": "calico"}, {"type": "portmap"}]}),
                "cali+",
            ),
            (
                json!({"name": "aws-cni", "plugins": [{"type": "aws-cni"}, {"type": "egress-cni"}, {"type": "portmap"}]}),
                "eni+,vlan+",
            ),
            (json!({"name": "cilium", "plugins": [{"type": "cilium-cni"}]}), "lxc+"),
            (json!({"name": "cbr0", "plugins": [{"type": "flannel", "delegate": {"hairpinMode": true}}]}), "cni0"),
            (json!({"name": "cbr0", "plugins": [{"type": "flannel", "delegate": {"bridge": "cbr1"}}]}), "cbr1"),
            (json!({"name": "kubernetes", "plugins": [{"type": "bridge", "bridge": "kube-bridge"}]}), "kube-bridge"),
            (json!({"name": "weave", "plugins": [{"type": "weave-net"}]}), "weave"),
            (json!({"name": "mynet", "type": "bridge"}), "cni0"),
            (json!({"name": "multus", "type": "multus", "delegates": [{"plugins": [{"type": "calico"}]}]}), "cali+"),
        ];
        for (config, expected) in cases {
            let (_, interfaces) = from_config(&config).unwrap().unwrap();
            assert_eq!(interfaces.to_string(), expected, "{config}");
        }
        assert_eq!(from_config(&json!({"plugins": [{"type": "romana"}]})), Some(Err("romana".to_string())));
        assert_eq!(from_config(&json!({"name": "x"})), None);
    }

    #[test]
    fn calico_configuration_wins_over_bridge_and_docker_links() {
        let dir = dir_with(&[("10-calico.conflist", json!({"plugins": [{"type": "calico"}]}))]);
        let detection = detect(dir.path(), &links(&["lo", "eth0", "cni0", "docker0"]));
        assert_eq!(found(&detection), ("cali+".into(), "Calico"));
    }

    #[test]
    fn the_aws_vpc_cni_intercepts_eni_and_vlan_links() {
        let dir = dir_with(&[("10-aws.conflist", json!({"plugins": [{"type": "aws-cni"}, {"type": "portmap"}]}))]);
        let detection = detect(dir.path(), &links(&["lo", "eth0", "docker0"]));
        assert_eq!(found(&detection), ("eni+,vlan+".into(), "AWS VPC CNI"));
    }

    #[test]
    fn the_first_file_is_the_one_the_runtime_uses() {
        let dir = dir_with(&[
            ("20-flannel.conflist", json!({"plugins": [{"type": "flannel"}]})),
            ("10-calico.conflist", json!({"plugins": [{"type": "calico"}]})),
            ("05-broken.conf", json!("not an object")),
            ("99-notes.txt", json!({"type": "bridge"})),
        ]);
        assert_eq!(found(&detect(dir.path(), &[])).0, "cali+");
    }

    #[test]
    fn without_configuration_links_decide_but_never_docker0() {
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(found(&detect(empty.path(), &links(&["lo", "eth0", "cali12ab"]))).0, "cali+");
        assert_eq!(found(&detect(Path::new("/nonexistent"), &links(&["lo", "cni0"]))).0, "cni0");
        let Detection::Waiting(why) = detect(empty.path(), &links(&["lo", "eth0", "docker0"])) else {
            panic!("docker0 alone must not be picked")
        };
        assert!(why.contains("no CNI configuration") && why.contains("--host-interface"), "{why}");
    }

    #[test]
    fn an_unknown_plugin_waits_and_names_the_fix() {
        let dir = dir_with(&[("10-x.conflist", json!({"plugins": [{"type": "romana"}]}))]);
        let Detection::Waiting(why) = detect(dir.path(), &links(&["cni0"])) else { panic!("must not guess") };
        assert!(why.contains("\"romana\"") && why.contains("Calico: cali+"), "{why}");
    }
}
