//! Forgetting connections to the metadata address that were made before iamlet's rules.
//!
//! NAT is decided once per connection, when conntrack first sees it: a pod's keep-alive
//! connection to 169.254.169.254 opened before the DNAT existed keeps talking to the node's
//! real metadata service for as long as it lives. Deleting those conntrack entries makes the
//! next packet of such a connection start over: it is DNAT'd to iamlet (which resets it, not
//! knowing the connection) or, without the DNAT, refused by the backstop. Either way the SDK
//! reconnects and reaches iamlet.
//!
//! Only entries still answered by the metadata address itself are deleted (`--reply-src`):
//! connections already redirected to iamlet are left alone. The `conntrack` tool (the
//! iamlet image ships it) does the dump-filter-delete over netlink.

use std::process::Stdio;

use super::rules::Family;

/// Why the entries could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack not found: install the conntrack package (the iamlet image has it)")]
    Missing,
    #[error("`conntrack -D` failed: {0}")]
    Failed(String),
}

/// The arguments that delete un-redirected connections to `family`'s metadata address.
pub fn delete_args(family: Family) -> Vec<String> {
    let address = family.metadata_ip().to_string();
    let family = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    ["-D", "-f", family, "-p", "tcp", "--orig-dst", &address, "--orig-port-dst", "80", "--reply-src", &address]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The count in conntrack's summary line (`N flow entries have been deleted.`).
pub fn deleted_count(stderr: &str) -> Option<usize> {
    stderr.lines().find_map(|line| {
        let (_, rest) = line.split_once("): ")?;
        rest.strip_suffix(" flow entries have been deleted.")?.trim().parse().ok()
    })
}

/// Deletes the connections to the metadata address of `family` that iamlet does not answer;
/// returns how many there were.
pub async fn forget_unredirected(family: Family) -> Result<usize, ConntrackError> {
    let output = tokio::process::Command::new("conntrack")
        .args(delete_args(family))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConntrackError::Missing,
            _ => ConntrackError::Failed(e.to_string()),
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // conntrack exits 1 when nothing matched; the summary line says so.
    match deleted_count(&stderr) {
        Some(count) => Ok(count),
        None => Err(ConntrackError::Failed(stderr.trim().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_only_flows_still_answered_by_the_metadata_address() {
        assert_eq!(
            delete_args(Family::V4).join(" "),
            "-D -f ipv4 -p tcp --orig-dst 169.254.169.254 --orig-port-dst 80 --reply-src 169.254.169.254"
        );
        assert!(delete_args(Family::V6).join(" ").contains("--orig-dst fd00:ec2::254 "));
    }

    #[test]
    fn reads_the_summary_line() {
        assert_eq!(deleted_count("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"), Some(0));
        assert_eq!(
            deleted_count(
                "tcp 6 431999 ESTABLISHED ...\nconntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"), None);
    }
}
