//! What `nft -j list table <family> iamlet` says is installed: rules, set elements (written
//! as [`super::ruleset::sets`] writes them, so the two compare) and drop counters. Pure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use macaddr::MacAddr6 as Mac;
use serde_json::Value;

use super::ruleset::{mac_text, raw_v6};

/// One table as listed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    /// Rules in all its chains.
    pub rules: usize,
    /// Each set's elements, normalised and sorted.
    pub sets: BTreeMap<String, Vec<String>>,
    /// Each named counter's packets.
    pub counters: BTreeMap<String, u64>,
}

/// Parses nft's JSON output. Errors: not JSON, or no `nftables` array.
pub fn parse(json: &str) -> Result<Listing, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| format!("nft's JSON: {e}"))?;
    let objects = value["nftables"].as_array().ok_or("nft's JSON has no `nftables` array")?;
    let mut listing = Listing::default();
    for object in objects {
        if object.get("rule").is_some() {
            listing.rules += 1;
        } else if let Some(set) = object.get("set") {
            let name = set["name"].as_str().unwrap_or_default().to_string();
            let types: Vec<&str> = match &set["type"] {
                Value::Array(types) => types.iter().filter_map(Value::as_str).collect(),
                other => other.as_str().into_iter().collect(),
            };
            let mut elements: Vec<String> =
                set["elem"].as_array().into_iter().flatten().map(|e| element(e, &types)).collect();
            elements.sort();
            listing.sets.insert(name, elements);
        } else if let Some(counter) = object.get("counter") {
            let name = counter["name"].as_str().unwrap_or_default().to_string();
            listing.counters.insert(name, counter["packets"].as_u64().unwrap_or(0));
        }
    }
    Ok(listing)
}

/// One element, normalised by the set's types: interface names quoted, addresses, MACs and
/// the ND target's integer as the ruleset writes them.
fn element(value: &Value, types: &[&str]) -> String {
    let parts: Vec<&Value> = match value.get("concat").and_then(Value::as_array) {
        Some(parts) => parts.iter().collect(),
        None => vec![value],
    };
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let text = part.as_str().unwrap_or_default();
            match types.get(i) {
                Some(&"ifname") => format!("\"{text}\""),
                _ => scalar(text),
            }
        })
        .collect::<Vec<_>>()
        .join(" . ")
}

fn scalar(text: &str) -> String {
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(number) = u128::from_str_radix(hex, 16)
    {
        return raw_v6(&Ipv6Addr::from(number));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return ip.to_string();
    }
    if let Ok(mac) = text.parse::<Mac>() {
        return mac_text(&mac);
    }
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nftables 1.0.6 printed for a bridge table with one bound pod.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "bridge", "name": "iamlet", "handle": 3}},
        {"set": {"family": "bridge", "name": "nd_targets", "table": "iamlet", "type": "integer", "handle": 2,
                 "elem": ["0xfd420000000000000000000000000005"]}},
        {"set": {"family": "bridge", "name": "bound4", "table": "iamlet", "type": ["ifname", "ether_addr", "ipv4_addr"],
                 "elem": [{"concat": ["veth1", "0a:58:0a:2a:00:05", "10.42.0.5"]}]}},
        {"set": {"family": "bridge", "name": "ips6", "table": "iamlet", "type": "ipv6_addr", "handle": 4}},
        {"set": {"family": "bridge", "name": "bridge_ports", "table": "iamlet", "type": "ifname", "elem": ["veth1"]}},
        {"counter": {"family": "bridge", "name": "spoofed_arp", "table": "iamlet", "packets": 3, "bytes": 126}},
        {"chain": {"family": "bridge", "table": "iamlet", "name": "check", "handle": 1}},
        {"rule": {"family": "bridge", "table": "iamlet", "chain": "check", "handle": 4, "expr": []}},
        {"rule": {"family": "bridge", "table": "iamlet", "chain": "check", "handle": 5, "expr": []}}]}"#;

    #[test]
    fn reads_rules_sets_and_counters_as_the_ruleset_writes_them() {
        let listing = parse(LISTED).unwrap();
        assert_eq!(listing.rules, 2);
        assert_eq!(listing.sets["bound4"], ["\"veth1\" . 0a:58:0a:2a:00:05 . 10.42.0.5"]);
        assert_eq!(listing.sets["nd_targets"], ["0xfd420000000000000000000000000005"]);
        assert_eq!(listing.sets["ips6"], Vec::<String>::new(), "an empty set is listed without `elem`");
        assert_eq!(listing.counters["spoofed_arp"], 3);
        assert_eq!(listing.sets["bridge_ports"], ["\"veth1\""], "an interface name is quoted, as written");
        assert!(parse("not json").is_err());
        assert!(parse("{}").is_err());
    }
}
