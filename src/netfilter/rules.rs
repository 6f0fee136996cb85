//! The rules iamlet owns, as text: pure, so what is installed is tested without iptables.
//!
//! Two tables, each with iamlet's own chain reached by tagged jumps from a base chain:
//!
//! - **nat** `PREROUTING` → `IAMLET`: DNAT pod metadata traffic to the agent;
//! - **filter** `FORWARD` → `IAMLET`: reject pod metadata traffic that was *not* DNAT'd. DNAT'd
//!   traffic is addressed to the agent, a local address, so it never passes FORWARD; this
//!   backstop only ever sees what would otherwise reach the node's real metadata service (the
//!   nat rules flushed by someone, or not yet in place).
//!
//! Install, repair and removal are each one `iptables-restore --noflush` transaction, so
//! there is no moment in which pod traffic can slip past (a `:CHAIN` line flushes that chain
//! inside the transaction). Every rule carries the same comment, so iamlet (and
//! `iamlet cleanup`) finds exactly what it added and never touches anyone else's rules.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::interfaces::InterfaceMatch;

/// iamlet's chain, in each of its tables.
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
    pub fn metadata_ip(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::from([169, 254, 169, 254]),
            Family::V6 => IpAddr::from([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]),
        }
    }

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

/// A table iamlet writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The backstop: `FORWARD` → reject.
    Filter,
    /// The redirect: `PREROUTING` → DNAT.
    Nat,
}

impl Table {
    /// In the order they are installed: the backstop first, so traffic is refused rather than
    /// leaked while the redirect is being written (removal goes the other way).
    pub const INSTALL_ORDER: [Table; 2] = [Table::Filter, Table::Nat];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }

    /// The built-in chain holding iamlet's jumps.
    pub fn base_chain(self) -> &'static str {
        match self {
            Table::Filter => "FORWARD",
            Table::Nat => "PREROUTING",
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The jumps into iamlet's chain, one per interface pattern: pod metadata traffic only.
pub fn jump_rules(family: Family, interfaces: &InterfaceMatch) -> Vec<Vec<String>> {
    interfaces
        .patterns()
        .iter()
        .map(|pattern| {
            let mut rule = strings(&["-d", family.metadata_cidr(), "-p", "tcp", "-m", "tcp", "--dport", "80"]);
            rule.extend(pattern.iptables_args());
            rule.extend(strings(&["-m", "comment", "--comment", COMMENT, "-j", CHAIN]));
            rule
        })
        .collect()
}

/// The one rule in iamlet's chain of `table`: DNAT to the agent, or reject with a reset so
/// SDKs fail at once (connection refused) instead of waiting out their timeout.
pub fn chain_rule(table: Table, target: SocketAddr) -> Vec<String> {
    let mut rule = strings(&["-p", "tcp", "-m", "comment", "--comment", COMMENT, "-j"]);
    match table {
        Table::Nat => {
            rule.extend(strings(&["DNAT", "--to-destination"]));
            rule.push(target.to_string()); // `10.0.0.5:8181` or `[fd00::5]:8181`, as iptables takes them
        }
        Table::Filter => rule.extend(strings(&["REJECT", "--reject-with", "tcp-reset"])),
    }
    rule
}

/// What one table holds of iamlet's, from `iptables -t <table> -S`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// The jumps into iamlet's chain, as the listing has them (the arguments after `-A BASE`).
    pub jumps: Vec<String>,
    /// Whether the chain exists.
    pub chain: bool,
    /// How many rules the chain has.
    pub chain_rules: usize,
}

impl Present {
    pub fn from_listing(table: Table, listing: &str) -> Self {
        let base = format!("-A {} ", table.base_chain());
        let ours = format!("-A {CHAIN} ");
        let jumps = listing
            .lines()
            .filter_map(|line| line.strip_prefix(base.as_str()))
            .filter(|rule| rule.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["-j", CHAIN]))
            .map(str::to_string)
            .collect();
        Self {
            jumps,
            chain: listing.lines().any(|line| line == format!("-N {CHAIN}")),
            chain_rules: listing.lines().filter(|line| line.starts_with(&ours)).count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.jumps.is_empty() && !self.chain
    }
}

/// The `iptables-restore --noflush` section that installs iamlet's rules in `table`,
/// replacing whatever of iamlet's is `present` there: the chain is flushed and refilled, old
/// jumps deleted and the new ones inserted first in the base chain, all in one commit.
pub fn install_section(table: Table, present: &Present, jumps: &[Vec<String>], rule: &[String]) -> String {
    let base = table.base_chain();
    let mut out = format!("*{}\n:{CHAIN} - [0:0]\n-A {CHAIN} {}\n", table.name(), rule.join(" "));
    for old in &present.jumps {
        let _ = writeln!(out, "-D {base} {old}");
    }
    // Inserted at 1 in reverse, so they end up first and in the order given.
    for jump in jumps.iter().rev() {
        let _ = writeln!(out, "-I {base} 1 {}", jump.join(" "));
    }
    out.push_str("COMMIT\n");
    out
}

/// The section that removes every jump to iamlet's chain and the chain itself from `table`.
pub fn remove_section(table: Table, present: &Present) -> String {
    let mut out = format!("*{}\n", table.name());
    for old in &present.jumps {
        let _ = writeln!(out, "-D {} {old}", table.base_chain());
    }
    if present.chain {
        // Declaring the chain flushes it, so it can be deleted.
        let _ = write!(out, ":{CHAIN} - [0:0]\n-X {CHAIN}\n");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cali() -> InterfaceMatch {
        InterfaceMatch::parse("cali+").unwrap()
    }

    #[test]
    fn jumps_match_metadata_traffic_on_each_interface() {
        let rules = jump_rules(Family::V4, &cali());
        assert_eq!(
            rules[0].join(" "),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -i cali+ -m comment --comment iamlet-metadata -j IAMLET"
        );
        let rules = jump_rules(Family::V6, &InterfaceMatch::parse("eni+,vlan+").unwrap());
        assert_eq!(rules.len(), 2);
        assert!(rules[0].join(" ").starts_with("-d fd00:ec2::254/128 ") && rules[1].contains(&"vlan+".to_string()));
        let negated = jump_rules(Family::V4, &InterfaceMatch::parse("!eth0").unwrap())[0].join(" ");
        assert!(negated.contains(" ! -i eth0 "), "{negated}");
    }

    #[test]
    fn nat_redirects_to_the_agent_and_filter_refuses() {
        let target: SocketAddr = "10.0.0.5:8181".parse().unwrap();
        assert_eq!(chain_rule(Table::Nat, target).last().unwrap(), "10.0.0.5:8181");
        assert_eq!(chain_rule(Table::Nat, "[fd00::5]:8181".parse().unwrap()).last().unwrap(), "[fd00::5]:8181");
        let reject = chain_rule(Table::Filter, target).join(" ");
        assert!(reject.ends_with("-j REJECT --reject-with tcp-reset"), "{reject}");
        assert_eq!(Family::V6.metadata_ip().to_string(), "fd00:ec2::254");
    }

    #[test]
    fn finds_only_its_own_rules_in_a_listing() {
        let listing = "-P PREROUTING ACCEPT\n-N IAMLET\n-N KUBE-SERVICES\n\
            -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment iamlet-metadata -j IAMLET\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A PREROUTING -j IAMLET-OTHER\n\
            -A PREROUTING -d 169.254.169.254/32 -i eth0 -j IAMLET\n\
            -A IAMLET -p tcp -j DNAT --to-destination 10.0.0.5:8181\n";
        let present = Present::from_listing(Table::Nat, listing);
        assert_eq!(present.jumps.len(), 2);
        assert_eq!(present.jumps[1], "-d 169.254.169.254/32 -i eth0 -j IAMLET");
        assert!(present.chain && present.chain_rules == 1);
        assert!(Present::from_listing(Table::Filter, listing).jumps.is_empty(), "FORWARD has none");
        assert!(Present::from_listing(Table::Filter, "-P FORWARD ACCEPT\n").is_empty());
    }

    #[test]
    fn install_replaces_in_one_commit_with_the_jumps_first() {
        let present = Present { jumps: vec!["-i cni0 -j IAMLET".into()], chain: true, chain_rules: 1 };
        let interfaces = InterfaceMatch::parse("eni+,vlan+").unwrap();
        let text = install_section(
            Table::Nat,
            &present,
            &jump_rules(Family::V4, &interfaces),
            &chain_rule(Table::Nat, "10.0.0.5:8181".parse().unwrap()),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":IAMLET - [0:0]", "declaring the chain flushes it in the same commit");
        assert!(lines[2].starts_with("-A IAMLET ") && lines[2].ends_with("--to-destination 10.0.0.5:8181"));
        assert_eq!(lines[3], "-D PREROUTING -i cni0 -j IAMLET");
        assert!(lines[4].starts_with("-I PREROUTING 1 ") && lines[4].contains("vlan+"), "inserted in reverse");
        assert!(lines[5].contains("eni+"), "so eni+ ends up first");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
    }

    #[test]
    fn removal_deletes_jumps_then_the_chain() {
        let present = Present { jumps: vec!["-i cali+ -j IAMLET".into()], chain: true, chain_rules: 1 };
        assert_eq!(
            remove_section(Table::Filter, &present),
            "*filter\n-D FORWARD -i cali+ -j IAMLET\n:IAMLET - [0:0]\n-X IAMLET\nCOMMIT\n"
        );
        assert_eq!(remove_section(Table::Nat, &Present::default()), "*nat\nCOMMIT\n");
    }
}
