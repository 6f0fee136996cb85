//! The binding's kernel rules, as nftables text: pure, so what is installed is tested without
//! a kernel.
//!
//! Two tables named `iamlet`, each with a base chain at prerouting, priority -300 (before the
//! bridge learns a MAC, before conntrack and before any DNAT):
//!
//! - **`bridge iamlet`**, for pods on a bridge (`cni0`, `weave`, `kube-bridge`). The bridge
//!   family sees each frame with the port it came in on. On every bridge port, a frame is
//!   dropped when it claims a bound pod's identity from anything but that pod's port: its MAC
//!   (which would teach the bridge to send the pod's frames to the attacker), its address in
//!   ARP, as an IPv4 or IPv6 source, or as a neighbour advertisement's target. On the pod
//!   bridges' own ports (the `bridge_ports` set, read from sysfs: `meta ibrname` needs a
//!   kernel module many nodes lack), VLAN-tagged frames are dropped too, and traffic for the
//!   metadata address from any (port, MAC, address) that is not a bound pod's.
//! - **`inet iamlet`**, for pods on routed per-pod links (`cali+`, `eni+`, `vlan+`): a bound
//!   pod's address is accepted only from its own link, and the metadata address only from a
//!   (link, address) that is bound.
//!
//! Each drop is counted in a named counter per family (`spoofed_ether`, `spoofed_arp`,
//! `spoofed_ipv4`, `spoofed_ipv6`): `iamlet_spoofed_packets_total{family}`.
//!
//! Installing replaces both tables in one `nft -f` transaction (`table …; delete table …;
//! table … {…}`), so there is no moment without them; a change of pods flushes and refills the
//! sets in one transaction, leaving the chains and counters alone.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

use macaddr::MacAddr6 as Mac;

use crate::netfilter::interfaces::{InterfaceMatch, InterfacePattern};
use crate::netfilter::rules::Family;
use crate::ports::BoundPort;

/// The tables' name, in each family.
pub const TABLE: &str = "iamlet";
/// The drop counters' names, by the `family` label they are reported under.
pub const COUNTERS: [(&str, &str); 4] =
    [("ether", "spoofed_ether"), ("arp", "spoofed_arp"), ("ipv4", "spoofed_ipv4"), ("ipv6", "spoofed_ipv6")];

/// Where pods sit: bridges (checked in the bridge family, by port), routed per-pod links
/// (checked in the inet family, by interface), and single links every pod's traffic shares
/// (Antrea's `antrea-gw0`, an Open vSwitch port), where ports cannot be told apart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    pub bridges: Vec<String>,
    pub routed: Vec<InterfacePattern>,
    pub shared: Vec<String>,
}

impl Layout {
    /// Splits the interfaces the DNAT matches: a plain name that `is_bridge` says is a Linux
    /// bridge goes to the bridge family; a wildcard or a negation (`cali+`, `!eth0`) names
    /// per-pod links, checked by interface; any other plain name is one link all pods share.
    pub fn of(interfaces: &InterfaceMatch, is_bridge: impl Fn(&str) -> bool) -> Self {
        let mut layout = Self::default();
        for pattern in interfaces.patterns() {
            if pattern.wildcard || pattern.negated {
                layout.routed.push(pattern.clone());
            } else if is_bridge(&pattern.name) {
                layout.bridges.push(pattern.name.clone());
            } else {
                layout.shared.push(pattern.name.clone());
            }
        }
        layout
    }

    /// The families with a table: `bridge`, `inet`, or both.
    pub fn families(&self) -> Vec<&'static str> {
        let mut families = Vec::new();
        if !self.bridges.is_empty() {
            families.push("bridge");
            families.push("netdev");
        }
        if !self.routed.is_empty() {
            families.push("inet");
        }
        families
    }
}

/// The sets' contents, in a canonical order (so two equal bindings render equal text).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Elements {
    /// Every port of the pod bridges, bound or not: the frames checked.
    pub bridge_ports: Vec<String>,
    /// `ifname . ether_addr` of every bound port with a MAC.
    pub port_macs: Vec<(String, Mac)>,
    /// `ifname . ether_addr . ip` (bridges) for each address of a port with a MAC.
    pub bridged: Vec<(String, Mac, IpAddr)>,
    /// `ifname . ip` (routed links) for each address of every bound port.
    pub routed: Vec<(String, IpAddr)>,
    /// The pod bridges' own MACs and addresses (the pods' gateway, link-local included),
    /// which no pod port may claim.
    pub node: NodeIdentity,
}

/// The node's side of its pod bridges: what a pod would claim to pass for the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeIdentity {
    pub macs: Vec<Mac>,
    pub ips: Vec<IpAddr>,
}

impl Elements {
    /// From the bound ports and the ports the pod bridges have now.
    pub fn of(ports: &[BoundPort], bridge_ports: Vec<String>, node: NodeIdentity) -> Self {
        let mut elements = Self { bridge_ports, node, ..Self::default() };
        elements.bridge_ports.sort();
        elements.bridge_ports.dedup();
        for port in ports {
            if let Some(mac) = port.mac {
                elements.port_macs.push((port.port.clone(), mac));
                elements.bridged.extend(port.ips.iter().map(|ip| (port.port.clone(), mac, *ip)));
            }
            elements.routed.extend(port.ips.iter().map(|ip| (port.port.clone(), *ip)));
        }
        elements.port_macs.sort();
        elements.port_macs.dedup();
        elements.bridged.sort();
        elements.bridged.dedup();
        elements.routed.sort();
        elements.routed.dedup();
        elements
    }
}

/// The whole ruleset: replaces iamlet's tables (creating them if absent) in one transaction,
/// with `elements` in the sets.
pub fn install(layout: &Layout, elements: &Elements) -> String {
    let mut text = String::new();
    if !layout.bridges.is_empty() {
        replace_table(&mut text, "bridge", &bridge_table());
    }
    if !layout.routed.is_empty() {
        replace_table(&mut text, "inet", &inet_table(layout));
    }
    text.push_str(&fill(layout, elements));
    text
}

/// The pod bridges' ports' ingress, in its own table (`netdev iamlet`), replaced whole.
///
/// A frame to an IEEE link-local group address (`01:80:c2:00:00:0X`: STP, LLDP, 802.1X...)
/// is learnt from by the bridge outside the bridge family's prerouting hook (LLDP's with no
/// hook at all), so one sent with a bound pod's MAC would move that pod's forwarding entry
/// unseen, and the attacker would read the node's answers to it. The netdev family's ingress
/// hook sees every frame of a device before the bridge does; pods on a pod bridge have no use
/// for these group addresses, so they are dropped (counted as `ether`). A device must exist
/// when its hook is registered: the table is rebuilt whenever the ports change.
pub fn ingress(ports: &[String]) -> String {
    let mut text = format!("table netdev {TABLE}\ndelete table netdev {TABLE}\ntable netdev {TABLE} {{\n  {COMMENT}\n");
    text.push_str("  counter spoofed_ether { }\n");
    if !ports.is_empty() {
        let devices = ports.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            text,
            "  chain ingress {{
    type filter hook ingress devices = {{ {devices} }} priority -500; policy accept;
    ether daddr & ff:ff:ff:ff:ff:f0 == 01:80:c2:00:00:00 counter name spoofed_ether drop
  }}"
        );
    }
    text.push_str("}\n");
    text
}

/// Removes iamlet's tables from `families` (`delete` after a no-op `add`, so a missing table
/// is no error).
pub fn remove(families: &[&str]) -> String {
    families.iter().map(|family| format!("table {family} {TABLE}\ndelete table {family} {TABLE}\n")).collect()
}

/// Empties every set and fills it with `elements`: one transaction with [`install`]'s tables
/// already in place.
pub fn fill(layout: &Layout, elements: &Elements) -> String {
    let mut text = String::new();
    for (family, set, items) in sets(layout, elements) {
        let _ = writeln!(text, "flush set {family} {TABLE} {set}");
        if !items.is_empty() {
            let _ = writeln!(text, "add element {family} {TABLE} {set} {{ {} }}", items.join(", "));
        }
    }
    text
}

/// Every set of the layout's tables, with its elements as nftables writes them, sorted: what
/// [`fill`] writes and what the drift check expects to read back.
pub fn sets(layout: &Layout, elements: &Elements) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let mut sets = Vec::new();
    let v4 = |ip: &IpAddr| ip.is_ipv4();
    if !layout.bridges.is_empty() {
        let bridged = |want_v4: bool| elements.bridged.iter().filter(move |e| v4(&e.2) == want_v4);
        let v6 = || {
            elements.bridged.iter().filter_map(|(p, m, ip)| match ip {
                IpAddr::V6(v6) => Some((p, m, v6)),
                IpAddr::V4(_) => None,
            })
        };
        let bound = |want_v4| unique(bridged(want_v4).map(|(p, m, ip)| format!("\"{p}\" . {} . {ip}", mac_text(m))));
        let ips = |want_v4| unique(bridged(want_v4).map(|e| e.2.to_string()));
        sets.push(("bridge", "bridge_ports", elements.bridge_ports.iter().map(|p| format!("\"{p}\"")).collect()));
        sets.push(("bridge", "macs", unique(elements.port_macs.iter().map(|(_, mac)| mac_text(mac)))));
        sets.push((
            "bridge",
            "port_macs",
            unique(elements.port_macs.iter().map(|(p, m)| format!("\"{p}\" . {}", mac_text(m)))),
        ));
        sets.push(("bridge", "ips4", ips(true)));
        sets.push(("bridge", "bound4", bound(true)));
        sets.push(("bridge", "ips6", ips(false)));
        sets.push(("bridge", "bound6", bound(false)));
        sets.push(("bridge", "nd_targets", unique(v6().map(|(_, _, ip)| raw_v6(ip)))));
        sets.push((
            "bridge",
            "nd_bound",
            unique(v6().map(|(p, m, ip)| format!("\"{p}\" . {} . {}", mac_text(m), raw_v6(ip)))),
        ));
        let node = &elements.node;
        let node_ips = |want_v4: bool| unique(node.ips.iter().filter(|ip| v4(ip) == want_v4).map(ToString::to_string));
        sets.push(("bridge", "node_macs", unique(node.macs.iter().map(mac_text))));
        sets.push(("bridge", "node_ips4", node_ips(true)));
        sets.push(("bridge", "node_ips6", node_ips(false)));
        let node_nd = node.ips.iter().filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(raw_v6(v6)),
            IpAddr::V4(_) => None,
        });
        sets.push(("bridge", "node_nd", unique(node_nd)));
    }
    if !layout.routed.is_empty() {
        let routed = |want_v4: bool| elements.routed.iter().filter(move |e| v4(&e.1) == want_v4);
        sets.push(("inet", "ips4", unique(routed(true).map(|e| e.1.to_string()))));
        sets.push(("inet", "bound4", unique(routed(true).map(|(p, ip)| format!("\"{p}\" . {ip}")))));
        sets.push(("inet", "ips6", unique(routed(false).map(|e| e.1.to_string()))));
        sets.push(("inet", "bound6", unique(routed(false).map(|(p, ip)| format!("\"{p}\" . {ip}")))));
    }
    sets
}

fn unique(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.collect();
    items.sort();
    items.dedup();
    items
}

fn replace_table(text: &mut String, family: &str, body: &str) {
    let _ =
        writeln!(text, "table {family} {TABLE}\ndelete table {family} {TABLE}\ntable {family} {TABLE} {{\n{body}}}");
}

/// A MAC as nftables writes it (lower-case, colons).
pub fn mac_text(mac: &Mac) -> String {
    let b = mac.as_bytes();
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
}

/// An IPv6 address as the 128-bit integer a raw payload match compares (the ND target).
pub fn raw_v6(ip: &Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(*ip))
}

const COMMENT: &str = "comment \"iamlet: each pod's addresses bound to its own port\"";

fn counters(text: &mut String, names: &[&str]) {
    for name in names {
        let _ = writeln!(text, "  counter {name} {{ }}");
    }
}

fn bridge_table() -> String {
    let mut t = String::new();
    let _ = writeln!(t, "  {COMMENT}");
    for (set, kind) in [
        ("bridge_ports", "type ifname"),
        ("macs", "type ether_addr"),
        ("port_macs", "type ifname . ether_addr"),
        ("ips4", "type ipv4_addr"),
        ("bound4", "type ifname . ether_addr . ipv4_addr"),
        ("ips6", "type ipv6_addr"),
        ("bound6", "type ifname . ether_addr . ipv6_addr"),
        // nftables 1.0.6 has no name for the ND target: it is the 16 bytes at bit 64 of ICMPv6.
        ("nd_targets", "typeof @th,64,128"),
        ("nd_bound", "typeof iifname . ether saddr . @th,64,128"),
        ("node_macs", "type ether_addr"),
        ("node_ips4", "type ipv4_addr"),
        ("node_ips6", "type ipv6_addr"),
        ("node_nd", "typeof @th,64,128"),
    ] {
        let _ = writeln!(t, "  set {set} {{ {kind}; }}");
    }
    counters(&mut t, &["spoofed_ether", "spoofed_arp", "spoofed_ipv4", "spoofed_ipv6"]);
    // A VLAN tag (802.1Q, or 802.1ad outside it) hides ARP and IP from the rules below, and a
    // bridge that is not VLAN-aware hands a priority-tagged frame (VLAN 0) to the node's
    // stack untagged: pods on a pod bridge send no tagged frames, so none gets through.
    let _ = writeln!(
        t,
        "  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname @bridge_ports ether type {{ 8021q, 8021ad }} counter name spoofed_ether drop
    jump identity
    iifname @bridge_ports jump unbound
  }}"
    );
    let (v4, v6) = (Family::V4.metadata_ip(), Family::V6.metadata_ip());
    // A bound pod's identity, claimed from anywhere else on any bridge: never legitimate, so
    // checked on every port, a new one the sets do not list yet included.
    let _ = writeln!(
        t,
        "  chain identity {{
    ether saddr @macs iifname . ether saddr != @port_macs counter name spoofed_ether drop
    arp saddr ip @ips4 iifname . arp saddr ether . arp saddr ip != @bound4 counter name spoofed_arp drop
    ip saddr @ips4 iifname . ether saddr . ip saddr != @bound4 counter name spoofed_ipv4 drop
    icmpv6 type nd-neighbor-advert @th,64,128 @nd_targets iifname . ether saddr . @th,64,128 != @nd_bound counter name spoofed_ipv6 drop
    ip6 saddr @ips6 iifname . ether saddr . ip6 saddr != @bound6 counter name spoofed_ipv6 drop
  }}"
    );
    // On the pod bridges' ports only (another bridge's guests, a VM's or Docker's, are none of
    // iamlet's business): the metadata address from anything but a bound pod, and the node's
    // own identity on the bridge (the pods' gateway) claimed by a pod.
    let _ = writeln!(
        t,
        "  chain unbound {{
    ip daddr {v4} tcp dport 80 iifname . ether saddr . ip saddr != @bound4 counter name spoofed_ipv4 drop
    ip6 daddr {v6} tcp dport 80 iifname . ether saddr . ip6 saddr != @bound6 counter name spoofed_ipv6 drop
    ether saddr @node_macs counter name spoofed_ether drop
    arp saddr ip @node_ips4 counter name spoofed_arp drop
    ip saddr @node_ips4 counter name spoofed_ipv4 drop
    icmpv6 type nd-neighbor-advert @th,64,128 @node_nd counter name spoofed_ipv6 drop
    ip6 saddr @node_ips6 counter name spoofed_ipv6 drop
  }}"
    );
    t
}

fn inet_table(layout: &Layout) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "  {COMMENT}");
    for (set, kind) in [
        ("ips4", "type ipv4_addr"),
        ("bound4", "type ifname . ipv4_addr"),
        ("ips6", "type ipv6_addr"),
        ("bound6", "type ifname . ipv6_addr"),
    ] {
        let _ = writeln!(t, "  set {set} {{ {kind}; }}");
    }
    counters(&mut t, &["spoofed_ipv4", "spoofed_ipv6"]);
    let _ = writeln!(t, "  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;");
    for pattern in &layout.routed {
        let op = if pattern.negated { "!= " } else { "" };
        let star = if pattern.wildcard { "*" } else { "" };
        let _ = writeln!(t, "    iifname {op}\"{}{star}\" jump check", pattern.name);
    }
    let _ = writeln!(t, "  }}");
    let (v4, v6) = (Family::V4.metadata_ip(), Family::V6.metadata_ip());
    let _ = writeln!(
        t,
        "  chain check {{
    ip saddr @ips4 iifname . ip saddr != @bound4 counter name spoofed_ipv4 drop
    ip daddr {v4} tcp dport 80 iifname . ip saddr != @bound4 counter name spoofed_ipv4 drop
    ip6 saddr @ips6 iifname . ip6 saddr != @bound6 counter name spoofed_ipv6 drop
    ip6 daddr {v6} tcp dport 80 iifname . ip6 saddr != @bound6 counter name spoofed_ipv6 drop
  }}"
    );
    t
}

/// How many rules each table's chains hold once installed: the drift check compares.
pub fn rule_count(family: &str, layout: &Layout) -> usize {
    match family {
        "bridge" => 15,
        "netdev" => 1,
        _ => layout.routed.len() + 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, mac: Option<&str>, ips: &[&str]) -> BoundPort {
        BoundPort {
            port: name.into(),
            mac: mac.map(|m| m.parse().unwrap()),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    fn layout(text: &str, bridges: &[&str]) -> Layout {
        Layout::of(&InterfaceMatch::parse(text).unwrap(), |name| bridges.contains(&name))
    }

    #[test]
    fn a_bridge_is_checked_by_port_and_a_routed_pattern_by_interface() {
        let both = layout("cni0,cali+", &["cni0"]);
        assert_eq!(both.bridges, ["cni0"]);
        assert_eq!(both.routed.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["cali+"]);
        assert_eq!(both.families(), ["bridge", "netdev", "inet"]);
        let text = install(&both, &Elements::default());
        assert!(text.contains("jump identity\n    iifname @bridge_ports jump unbound"), "{text}");
        assert!(text.contains("iifname @bridge_ports ether type { 8021q, 8021ad } counter"), "{text}");
        assert!(text.contains("iifname \"cali*\" jump check"), "{text}");
        let negated = install(&layout("!eth0", &[]), &Elements::default());
        assert!(negated.contains("iifname != \"eth0\" jump check"), "{negated}");
        let antrea = layout("antrea-gw0", &[]);
        assert_eq!((antrea.shared.as_slice(), antrea.families().len()), (&["antrea-gw0".to_string()][..], 0));
    }

    #[test]
    fn each_address_is_bound_to_its_port_and_mac_and_a_port_without_a_mac_only_on_routed_links() {
        let ports = [
            port("veth1", Some("0A:58:0A:2A:00:05"), &["10.42.0.5", "fd42::5"]),
            port("cali9", None, &["192.168.1.9"]),
        ];
        let gateway =
            NodeIdentity { macs: vec!["0a:58:0a:2a:00:01".parse().unwrap()], ips: vec!["10.42.0.1".parse().unwrap()] };
        let elements = Elements::of(&ports, vec!["veth2".into(), "veth1".into()], gateway);
        assert!(
            fill(&layout("cni0", &["cni0"]), &elements).contains("add element bridge iamlet node_ips4 { 10.42.0.1 }")
        );
        let text = fill(&layout("cni0,cali+", &["cni0"]), &elements);
        assert!(text.contains("add element bridge iamlet bridge_ports { \"veth1\", \"veth2\" }"), "{text}");
        assert!(
            text.contains("add element bridge iamlet bound4 { \"veth1\" . 0a:58:0a:2a:00:05 . 10.42.0.5 }"),
            "{text}"
        );
        assert!(
            text.contains("add element bridge iamlet bound6 { \"veth1\" . 0a:58:0a:2a:00:05 . fd42::5 }"),
            "{text}"
        );
        assert!(
            text.contains("add element bridge iamlet nd_targets { 0xfd420000000000000000000000000005 }"),
            "the ND target as the integer the raw match compares: {text}"
        );
        assert!(text.contains("add element bridge iamlet port_macs { \"veth1\" . 0a:58:0a:2a:00:05 }"), "{text}");
        assert!(!text.contains("bridge iamlet bound4 { \"cali9\""), "no MAC: never bound on a bridge: {text}");
        assert!(
            text.contains("add element inet iamlet bound4 { \"cali9\" . 192.168.1.9, \"veth1\" . 10.42.0.5 }"),
            "{text}"
        );
        assert!(text.contains("flush set inet iamlet bound6\nadd element inet iamlet bound6 { \"veth1\" . fd42::5 }"));
        assert!(text.contains("flush set bridge iamlet macs\nadd element"), "{text}");
    }

    #[test]
    fn empty_sets_are_flushed_and_not_filled() {
        let text = fill(&layout("cni0", &["cni0"]), &Elements::default());
        assert!(text.contains("flush set bridge iamlet bound4\nflush set bridge iamlet ips6"), "{text}");
        assert!(!text.contains("add element"), "{text}");
    }

    #[test]
    fn install_replaces_each_table_in_the_same_transaction() {
        let text = install(&layout("cni0", &["cni0"]), &Elements::default());
        let first = text.find("table bridge iamlet\ndelete table bridge iamlet\ntable bridge iamlet {").unwrap();
        assert!(text[first..].contains("flush set bridge iamlet bound4"));
        assert!(!text.contains("inet"), "no routed pattern, no inet table: {text}");
        assert_eq!(remove(&["bridge"]), "table bridge iamlet\ndelete table bridge iamlet\n");
        let ports = ingress(&["veth1".into(), "veth2".into()]);
        assert!(ports.contains("devices = { \"veth1\", \"veth2\" }"), "{ports}");
        assert!(ports.contains("01:80:c2:00:00:00 counter name spoofed_ether drop"), "{ports}");
        assert!(!ingress(&[]).contains("chain"), "no device, no hook");
    }
}
