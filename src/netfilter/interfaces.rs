//! `--host-interface`: which interface pod traffic arrives on, and CNI detection.
//!
//! kube2iam took the name as given and failed later with "route ip+net: no such network
//! interface". Here the pattern is parsed up front, checked against the node's links, and
//! `auto` picks the CNI's interface from the links present.

use std::fmt;

/// A `--host-interface` value, in iptables' own syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePattern {
    /// The name, or the prefix of a `+` wildcard.
    pub name: String,
    /// `cali+`: every interface whose name starts with `name`.
    pub wildcard: bool,
    /// `!eth0`: every interface except these.
    pub negated: bool,
}

/// The interface each CNI puts pods behind, in the order `auto` tries them.
pub const CNI_INTERFACES: &[(&str, &str)] = &[
    ("Calico", "cali+"),
    ("AWS VPC CNI", "eni+"),
    ("Cilium", "lxc+"),
    ("Weave Net", "weave"),
    ("kube-router", "kube-bridge"),
    ("flannel / bridge CNI", "cni0"),
    ("Docker", "docker0"),
];

/// Longest interface name Linux allows (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

impl InterfacePattern {
    /// Parses `eth0`, `cali+`, `!eth0` or `!cali+`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (negated, rest) = match text.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, text),
        };
        let (wildcard, name) = match rest.strip_suffix('+') {
            Some(name) => (true, name),
            None => (false, rest),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.@:".contains(c);
        if name.is_empty() && !wildcard {
            return Err(format!("{text:?} names no interface"));
        }
        if name.len() > MAX_NAME || !name.chars().all(valid) {
            return Err(format!(
                "{text:?} is not an interface name (at most 15 of a-z, 0-9, -_.@:), nor name+ or !name"
            ));
        }
        Ok(Self { name: name.to_string(), wildcard, negated })
    }

    /// Whether traffic arriving on `link` is intercepted.
    pub fn matches(&self, link: &str) -> bool {
        let named = if self.wildcard { link.starts_with(&self.name) } else { link == self.name };
        named != self.negated
    }

    /// The iptables match: `-i cali+` or `! -i eth0`.
    pub fn iptables_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.negated {
            args.push("!".to_string());
        }
        args.push("-i".to_string());
        args.push(format!("{}{}", self.name, if self.wildcard { "+" } else { "" }));
        args
    }

    /// Checks the pattern against the node's links. A missing exact name is an error (the
    /// rule would never match); a wildcard with no match yet is fine (Calico creates `cali*`
    /// as pods start), as is a negation.
    pub fn check_against(&self, links: &[String]) -> Result<(), String> {
        if self.wildcard || self.negated || links.iter().any(|l| l == &self.name) {
            return Ok(());
        }
        Err(format!(
            "--host-interface: no interface {:?} on this node. Interfaces here: {}. Per CNI: {}; or --host-interface=auto",
            self.name,
            if links.is_empty() { "none".to_string() } else { links.join(", ") },
            cni_table()
        ))
    }
}

impl fmt::Display for InterfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", if self.negated { "!" } else { "" }, self.name, if self.wildcard { "+" } else { "" })
    }
}

/// `Calico: cali+, AWS VPC CNI: eni+, ...`, for error messages.
pub fn cni_table() -> String {
    CNI_INTERFACES.iter().map(|(cni, iface)| format!("{cni}: {iface}")).collect::<Vec<_>>().join(", ")
}

/// The CNI whose interfaces are present, and its pattern.
pub fn detect_cni(links: &[String]) -> Option<(&'static str, InterfacePattern)> {
    CNI_INTERFACES.iter().find_map(|(cni, iface)| {
        let pattern = InterfacePattern::parse(iface).expect("the table's patterns are valid");
        links.iter().any(|link| pattern.matches(link)).then_some((*cni, pattern))
    })
}

/// The network interfaces of the current network namespace.
pub fn node_links() -> Vec<String> {
    let mut links: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    links.sort();
    links.dedup();
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_names_wildcards_and_negations() {
        let p = InterfacePattern::parse("cali+").unwrap();
        assert_eq!(p.iptables_args(), ["-i", "cali+"]);
        assert!(p.matches("cali1234") && !p.matches("eth0"));
        let p = InterfacePattern::parse("!eth0").unwrap();
        assert_eq!(p.iptables_args(), ["!", "-i", "eth0"]);
        assert!(p.matches("eni123") && !p.matches("eth0"));
        let p = InterfacePattern::parse("!eni+").unwrap();
        assert!(!p.matches("eni123") && p.matches("eth0"));
        let p = InterfacePattern::parse("cni0").unwrap();
        assert!(p.matches("cni0") && !p.matches("cni01"));
        assert_eq!(p.to_string(), "cni0");
    }

    #[test]
    fn refuses_what_iptables_would() {
        for bad in ["", "!", "a b", "name;rm", "x".repeat(16).as_str(), "eth0/1"] {
            assert!(InterfacePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_exact_interface_is_a_clear_error() {
        let error =
            InterfacePattern::parse("weave").unwrap().check_against(&links(&["lo", "eth0", "cali1"])).unwrap_err();
        assert!(error.contains("no interface \"weave\""), "{error}");
        assert!(error.contains("lo, eth0, cali1") && error.contains("Calico: cali+"), "{error}");
        assert!(InterfacePattern::parse("cali+").unwrap().check_against(&links(&["lo"])).is_ok());
        assert!(InterfacePattern::parse("!eth0").unwrap().check_against(&links(&["lo"])).is_ok());
    }

    #[test]
    fn detects_the_cni_from_its_links() {
        assert_eq!(detect_cni(&links(&["lo", "eth0", "cali12ab", "tunl0"])).unwrap().1.to_string(), "cali+");
        assert_eq!(detect_cni(&links(&["lo", "eth0", "eni0a1b"])).unwrap().0, "AWS VPC CNI");
        assert_eq!(detect_cni(&links(&["lo", "eth0", "cni0", "flannel.1"])).unwrap().1.to_string(), "cni0");
        assert_eq!(detect_cni(&links(&["lo", "eth0", "lxc1", "cilium_host"])).unwrap().1.to_string(), "lxc+");
        assert_eq!(detect_cni(&links(&["lo", "weave", "docker0"])).unwrap().1.to_string(), "weave");
        assert!(detect_cni(&links(&["lo", "eth0"])).is_none());
    }
}
