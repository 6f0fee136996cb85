//! The rules iamlet owns, as argument lists: pure, so their text is tested without iptables.
//!
//! Everything lives in iamlet's own nat chain, reached by one jump from PREROUTING; both carry
//! the same comment, so iamlet (and `iamlet cleanup`) can always find exactly what it added and
//! never touches anyone else's rules.

use std::net::{IpAddr, SocketAddr};

use super::interfaces::InterfacePattern;

/// iamlet's nat chain.
pub const CHAIN: &str = "IAMLET";
/// The comment on every rule iamlet adds.
pub const COMMENT: &str = "iamlet-metadata";

/// An IP family, with its tool and the metadata address pods use on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// IMDS's address on this family: 169.254.169.254, or fd00:ec2::254 on IPv6 (Nitro).
    pub fn metadata_cidr(self) -> &'static str {
        match self {
            Family::V4 => "169.254.169.254/32",
            Family::V6 => "fd00:ec2::254/128",
        }
    }

    /// `iptables` or `ip6tables`.
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The PREROUTING rule sending pod metadata traffic into iamlet's chain.
pub fn jump_rule(family: Family, interface: &InterfacePattern) -> Vec<String> {
    let mut rule = strings(&["-d", family.metadata_cidr(), "-p", "tcp", "-m", "tcp", "--dport", "80"]);
    rule.extend(interface.iptables_args());
    rule.extend(strings(&["-m", "comment", "--comment", COMMENT, "-j", CHAIN]));
    rule
}

/// The rule in iamlet's chain: DNAT to the agent.
pub fn dnat_rule(target: SocketAddr) -> Vec<String> {
    let mut rule = strings(&["-p", "tcp", "-m", "comment", "--comment", COMMENT, "-j", "DNAT", "--to-destination"]);
    rule.push(target.to_string()); // `10.0.0.5:8181` or `[fd00::5]:8181`, as iptables takes them
    rule
}

/// The PREROUTING rules that jump to iamlet's chain, from `iptables -S PREROUTING` output,
/// each as the arguments that delete it (without `-D PREROUTING`).
pub fn jumps_in_listing(listing: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix("-A PREROUTING "))
        .filter(|rule| rule.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["-j", CHAIN]))
        .map(|rule| rule.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The rules of a chain, from `iptables -S <chain>` output.
pub fn rules_of_chain(listing: &str, chain: &str) -> usize {
    let prefix = format!("-A {chain} ");
    listing.lines().filter(|line| line.starts_with(&prefix)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_rule_matches_metadata_traffic_on_the_interface() {
        let rule = jump_rule(Family::V4, &InterfacePattern::parse("cali+").unwrap()).join(" ");
        assert_eq!(
            rule,
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -i cali+ -m comment --comment iamlet-metadata -j IAMLET"
        );
        let rule = jump_rule(Family::V6, &InterfacePattern::parse("!eth0").unwrap()).join(" ");
        assert!(rule.starts_with("-d fd00:ec2::254/128 ") && rule.contains(" ! -i eth0 "), "{rule}");
    }

    #[test]
    fn dnat_targets_the_agent() {
        assert_eq!(dnat_rule("10.0.0.5:8181".parse().unwrap()).last().unwrap(), "10.0.0.5:8181");
        assert_eq!(dnat_rule("[fd00::5]:8181".parse().unwrap()).last().unwrap(), "[fd00::5]:8181");
    }

    #[test]
    fn finds_only_its_own_jumps_in_a_listing() {
        let listing = "-P PREROUTING ACCEPT\n\
            -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment iamlet-metadata -j IAMLET\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A PREROUTING -j IAMLET-OTHER\n\
            -A PREROUTING -d 169.254.169.254/32 -i eth0 -j IAMLET\n";
        let jumps = jumps_in_listing(listing);
        assert_eq!(jumps.len(), 2);
        assert_eq!(jumps[1], ["-d", "169.254.169.254/32", "-i", "eth0", "-j", "IAMLET"]);
        assert_eq!(rules_of_chain(listing, "PREROUTING"), 4);
    }
}
