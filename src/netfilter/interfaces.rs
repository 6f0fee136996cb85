//! `--host-interface`: which interfaces pod traffic arrives on.
//!
//! kube2iam took one name as given and failed later with "route ip+net: no such network
//! interface". Here the value is parsed up front into iptables' own syntax, and may list
//! several patterns (`eni+,vlan+`: the AWS VPC CNI puts pods with security groups behind
//! `vlan*` links, the others behind `eni*`). `auto` is resolved by [`super::cni`].

use std::fmt;

/// One `--host-interface` pattern, in iptables' own syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePattern {
    /// The name, or the prefix of a `+` wildcard.
    pub name: String,
    /// `cali+`: every interface whose name starts with `name`.
    pub wildcard: bool,
    /// `!eth0`: every interface except these.
    pub negated: bool,
}

/// Every interface pod traffic may arrive on: one or more patterns, any of which matches.
/// A negation (`!eth0`) stands alone, since "not eth0 or not eth1" would match everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceMatch {
    patterns: Vec<InterfacePattern>,
}

/// Why a `--host-interface` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceError {
    #[error("{0:?} names no interface")]
    Empty(String),
    #[error("{0:?} is not an interface name (at most 15 of a-z, 0-9, -_.@:), nor name+ or !name")]
    NotAName(String),
    #[error("{0:?}: a negation (!name) must stand alone, as in !eth0")]
    NegationInList(String),
    #[error("{0:?}: at most 8 patterns")]
    TooMany(String),
}

impl InterfaceMatch {
    /// Parses `cali+`, `eni+,vlan+` or `!eth0`.
    pub fn parse(text: &str) -> Result<Self, InterfaceError> {
        let patterns = text.split(',').map(str::trim).map(InterfacePattern::parse).collect::<Result<Vec<_>, _>>()?;
        if patterns.len() > 1 && patterns.iter().any(|p| p.negated) {
            return Err(InterfaceError::NegationInList(text.to_string()));
        }
        if patterns.len() > 8 {
            return Err(InterfaceError::TooMany(text.to_string()));
        }
        Ok(Self { patterns })
    }

    pub fn patterns(&self) -> &[InterfacePattern] {
        &self.patterns
    }

    /// Whether traffic arriving on `link` is intercepted.
    pub fn matches(&self, link: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(link))
    }

    /// The patterns nothing vouches for yet: no link on the node matches them, and the CNI
    /// configuration (`configured`, what `auto` would detect) does not name them. Until
    /// every pattern is vouched for, the pods may sit behind an interface the rules miss
    /// (`--host-interface weave` on a flannel node leaves every pod on `cni0` uncovered), so
    /// iamlet waits, not ready. The configuration vouches for links the CNI creates with
    /// its first pod (`cni0`, `cali*`), which the startup taint keeps off the node. A
    /// negation (`!eth0`) is always vouched for.
    pub fn unvouched<'a>(&'a self, links: &[String], configured: Option<&InterfaceMatch>) -> Vec<&'a InterfacePattern> {
        let named_by_configuration = |p: &InterfacePattern| {
            configured
                .is_some_and(|c| c.patterns.iter().any(|c| c == p || (!c.wildcard && !c.negated && p.matches(&c.name))))
        };
        self.patterns
            .iter()
            .filter(|p| !p.negated && !links.iter().any(|l| p.matches(l)) && !named_by_configuration(p))
            .collect()
    }
}

impl From<InterfacePattern> for InterfaceMatch {
    fn from(pattern: InterfacePattern) -> Self {
        Self { patterns: vec![pattern] }
    }
}

impl fmt::Display for InterfaceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.patterns.iter().map(ToString::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

/// Longest interface name Linux allows (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

impl InterfacePattern {
    /// Parses `eth0`, `cali+`, `!eth0` or `!cali+`.
    pub fn parse(text: &str) -> Result<Self, InterfaceError> {
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
            return Err(InterfaceError::Empty(text.to_string()));
        }
        if name.len() > MAX_NAME || !name.chars().all(valid) {
            return Err(InterfaceError::NotAName(text.to_string()));
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
}

impl fmt::Display for InterfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", if self.negated { "!" } else { "" }, self.name, if self.wildcard { "+" } else { "" })
    }
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
    fn lists_match_any_of_their_patterns() {
        let aws = InterfaceMatch::parse("eni+, vlan+").unwrap();
        assert_eq!(aws.to_string(), "eni+,vlan+");
        assert!(aws.matches("eni1a2b") && aws.matches("vlan.eth.1") && !aws.matches("eth0"));
        assert_eq!(aws.patterns().len(), 2);
        for bad in ["!eth0,eni+", "eni+,", "eni+,!eth1"] {
            assert!(InterfaceMatch::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pattern_is_vouched_for_by_a_link_or_by_the_cni_configuration() {
        let weave = InterfaceMatch::parse("weave").unwrap();
        let names = |m: &InterfaceMatch, l: &[&str], c: Option<&str>| -> Vec<String> {
            let configured = c.map(|c| InterfaceMatch::parse(c).unwrap());
            m.unvouched(&links(l), configured.as_ref()).iter().map(ToString::to_string).collect()
        };
        // A flannel node (cni0), with --host-interface naming another CNI's link.
        assert_eq!(names(&weave, &["lo", "eth0", "cni0"], Some("cni0")), ["weave"]);
        assert!(names(&weave, &["lo", "cni0", "weave"], Some("cni0")).is_empty(), "the link appeared");
        // The CNI creates cni0 with its first pod: its configuration vouches for it meanwhile.
        let cni0 = InterfaceMatch::parse("cni0").unwrap();
        assert!(names(&cni0, &["lo", "eth0"], Some("cni0")).is_empty());
        assert_eq!(names(&cni0, &["lo", "eth0"], None), ["cni0"]);
        // A wildcard needs one matching link, or the configuration's own pattern.
        let aws = InterfaceMatch::parse("eni+,vlan+").unwrap();
        assert_eq!(names(&aws, &["lo", "eth0", "eni1a2b"], None), ["vlan+"]);
        assert!(names(&aws, &["lo", "eth0"], Some("eni+,vlan+")).is_empty());
        assert_eq!(names(&InterfaceMatch::parse("cali+").unwrap(), &["lo", "cni0"], Some("cni0")), ["cali+"]);
        assert!(names(&InterfaceMatch::parse("cni+").unwrap(), &["lo"], Some("cni0")).is_empty());
        assert!(names(&InterfaceMatch::parse("!eth0").unwrap(), &["lo"], None).is_empty(), "a negation stands");
    }
}
