//! Which interfaces to intercept, from one look at the node: `--host-interface` as given, once
//! something vouches for each pattern, or detected under `auto`. The rule keeper looks again
//! until there is an answer; `iamlet explain` looks once. One function, so both say the same.

use std::path::Path;

use super::cni;
use super::interfaces::InterfaceMatch;

/// `--host-interface`: patterns given by the operator, or detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSetting {
    Auto,
    Given(InterfaceMatch),
}

/// What one look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The interfaces, and (under `auto`) the CNI and where it was read.
    Found { interfaces: InterfaceMatch, detected: Option<(&'static str, String)> },
    /// Not yet: what is awaited (for `/readyz`), and what the operator needs to know (logged once).
    Waiting { why: String, detail: String },
}

/// Looks at `links` (the node's) and the CNI configuration in `cni_conf_dir` once.
pub fn look(setting: &InterfaceSetting, cni_conf_dir: &Path, links: &[String]) -> Choice {
    match setting {
        InterfaceSetting::Given(interfaces) => {
            let configured = cni::configured(cni_conf_dir);
            let unvouched = interfaces.unvouched(links, configured.as_ref().map(|(_, _, i)| i));
            if unvouched.is_empty() {
                return Choice::Found { interfaces: interfaces.clone(), detected: None };
            }
            let absent: Vec<String> = unvouched.iter().map(ToString::to_string).collect();
            let why = format!(
                "--host-interface={interfaces}: no link matches {} on this node, and the CNI configuration does not \
                 name it",
                absent.join(", ")
            );
            let configuration = match &configured {
                Some((cni, from, detected)) => format!("{cni} in {from}, whose pods sit behind {detected}"),
                None => format!("none iamlet knows in {}", cni_conf_dir.display()),
            };
            let detail = format!(
                "{why}: waiting for it (not ready, the startup taint stays) since pods behind other interfaces would \
                 reach the node's metadata service. Fix --host-interface if it names the wrong CNI. Links: {}; CNI \
                 configuration: {configuration}. Per CNI: {}",
                links.join(", "),
                cni::cni_table()
            );
            Choice::Waiting { why, detail }
        }
        InterfaceSetting::Auto => match cni::detect(cni_conf_dir, links) {
            cni::Detection::Found { cni, from, interfaces } => {
                Choice::Found { interfaces, detected: Some((cni, from)) }
            }
            cni::Detection::Waiting(why) => {
                let detail = format!("--host-interface=auto: waiting for the CNI (not ready until then): {why}");
                Choice::Waiting { why, detail }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_given_interface_waits_until_vouched_for_and_says_what_for() {
        let empty = tempfile::tempdir().unwrap();
        let weave = InterfaceSetting::Given(InterfaceMatch::parse("weave").unwrap());
        let Choice::Waiting { why, detail } = look(&weave, empty.path(), &links(&["lo", "cni0"])) else {
            panic!("weave is not there")
        };
        assert!(why.contains("no link matches weave"), "{why}");
        assert!(detail.contains("Links: lo, cni0") && detail.contains("Calico: cali+"), "{detail}");
        assert!(matches!(look(&weave, empty.path(), &links(&["weave"])), Choice::Found { detected: None, .. }));
    }

    #[test]
    fn auto_detects_or_waits_for_the_cni() {
        let empty = tempfile::tempdir().unwrap();
        let Choice::Found { interfaces, detected } = look(&InterfaceSetting::Auto, empty.path(), &links(&["cni0"]))
        else {
            panic!("cni0 is flannel's")
        };
        assert_eq!((interfaces.to_string(), detected.unwrap().0), ("cni0".into(), "flannel / bridge CNI"));
        let waiting = look(&InterfaceSetting::Auto, empty.path(), &links(&["lo", "docker0"]));
        assert!(matches!(waiting, Choice::Waiting { detail, .. } if detail.contains("waiting for the CNI")));
    }
}
