//! Whether iamlet's rules outlive the agent: kept while it is being replaced, removed when it
//! is being uninstalled (`--iptables-keep-on-exit`).
//!
//! Removing the rules on every exit opens a window on every rolling update, drain or pod
//! deletion in which pods reach the node's real metadata service, and so the node's role.
//! Keeping them on every exit leaves an uninstalled node refusing every metadata request. So
//! by default (`auto`) iamlet asks the cluster whether a successor will come — its DaemonSet
//! still exists, is not being deleted and still runs on this node — and keeps the rules only
//! then. When it cannot tell (the API server unreachable), it keeps them: refused requests
//! are an outage a retry fixes; the node's credentials in a pod are a breach nothing undoes.

use std::fmt;

pub use crate::cluster::placement::Placement;

/// `--iptables-keep-on-exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepOnExit {
    /// Keep when replaced, remove when uninstalled (or not run by a DaemonSet at all).
    Auto,
    /// Always keep; `iamlet cleanup` removes them.
    Always,
    /// Always remove.
    Never,
}

impl KeepOnExit {
    /// `auto`, or a Go-style boolean (`true`, `false`, `1`, `0`, `t`, `f`).
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match auto_or_bool(text)? {
            None => KeepOnExit::Auto,
            Some(true) => KeepOnExit::Always,
            Some(false) => KeepOnExit::Never,
        })
    }
}

/// `auto` (`None`), or a Go-style boolean (`true`, `false`, `1`, `0`, `t`, `f`), as the
/// kube2iam-era flags take them.
pub fn auto_or_bool(text: &str) -> Result<Option<bool>, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "true" | "t" | "1" => Ok(Some(true)),
        "false" | "f" | "0" => Ok(Some(false)),
        _ => Err(format!("{text:?} is not auto, true or false")),
    }
}

/// What to do with the rules, and why (logged in one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Keep(String),
    Remove(String),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Keep(why) => write!(f, "keeping iamlet's rules: {why}"),
            Decision::Remove(why) => write!(f, "removing iamlet's rules: {why}"),
        }
    }
}

/// The decision for `setting`; `placement` is asked only under `auto`.
pub fn decide(setting: KeepOnExit, placement: impl FnOnce() -> Placement) -> Decision {
    match setting {
        KeepOnExit::Always => Decision::Keep("--iptables-keep-on-exit=true; `iamlet cleanup` removes them".into()),
        KeepOnExit::Never => Decision::Remove("--iptables-keep-on-exit=false".into()),
        KeepOnExit::Auto => match placement() {
            Placement::Replaced { daemonset } => Decision::Keep(format!(
                "DaemonSet {daemonset} still runs on this node, so this is a restart: pods are refused until \
                 the successor is ready, never answered by the node's metadata service"
            )),
            Placement::Removed { reason } => Decision::Remove(reason),
            Placement::Unknown { error } => Decision::Keep(format!(
                "cannot tell a restart from an uninstall ({error}), so failing closed; if iamlet was \
                 uninstalled, run `iamlet cleanup` on this node"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auto_and_go_booleans() {
        assert_eq!(KeepOnExit::parse("auto"), Ok(KeepOnExit::Auto));
        assert_eq!(KeepOnExit::parse("TRUE"), Ok(KeepOnExit::Always));
        assert_eq!(KeepOnExit::parse("0"), Ok(KeepOnExit::Never));
        assert!(KeepOnExit::parse("sometimes").is_err());
    }

    #[test]
    fn auto_keeps_for_a_restart_and_when_in_doubt() {
        let replaced = || Placement::Replaced { daemonset: "kube-system/iamlet".into() };
        assert!(matches!(decide(KeepOnExit::Auto, replaced), Decision::Keep(_)));
        let unknown = || Placement::Unknown { error: "connection refused".into() };
        let decision = decide(KeepOnExit::Auto, unknown);
        assert!(matches!(&decision, Decision::Keep(why) if why.contains("iamlet cleanup")), "{decision}");
        let removed = || Placement::Removed { reason: "DaemonSet kube-system/iamlet is gone".into() };
        assert_eq!(decide(KeepOnExit::Auto, removed), Decision::Remove("DaemonSet kube-system/iamlet is gone".into()));
    }

    #[test]
    fn explicit_settings_never_ask_the_cluster() {
        let never_asked = || -> Placement { panic!("asked") };
        assert!(matches!(decide(KeepOnExit::Always, never_asked), Decision::Keep(_)));
        assert!(matches!(decide(KeepOnExit::Never, never_asked), Decision::Remove(_)));
    }
}
