//! The IMDSv2 token key, kept in the state directory (`--state-dir`) so that a token stays
//! valid for its whole TTL across restarts and upgrades, as on EC2, but never across the
//! node's boot.
//!
//! The file is `token-key` (0600, in the 0700 directory): a header line, the boot it was made
//! in (`/proc/sys/kernel/random/boot_id`, the host's, also inside a container) and the key in
//! base64. `/run` is a tmpfs, so a reboot discards it; the boot id makes that true wherever
//! the directory is. A key of an earlier boot, one unreadable, or one iamlet did not write is
//! replaced. The key is never logged and never served: only [`TokenIssuer`] holds it once
//! loaded.

use std::io;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::token::{KEY_LEN, TokenIssuer, random_key};
use crate::state::{StateDir, StateDirError};

/// The key's file in the state directory.
pub const FILE: &str = "token-key";
const HEADER: &str = "iamlet-token-key v1";
/// Where the kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Where the key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Read from the state directory: tokens issued since the node booted stay valid.
    Read,
    /// Made and persisted; `replaced` says why a file that was there was not used.
    Made { replaced: Option<&'static str> },
}

/// The token issuer the agent starts with: its key from the state directory when there is
/// one of this boot, else a new one persisted there. Says once, at startup, where the key
/// came from; when it cannot be persisted, the agent still serves, and a warning says that
/// tokens will not survive a restart.
pub fn issuer(dir: Result<&StateDir, &StateDirError>) -> TokenIssuer {
    let loaded = dir.map_err(|error| error.to_string()).and_then(|dir| {
        let boot = std::fs::read_to_string(BOOT_ID).map_err(|error| format!("cannot read {BOOT_ID}: {error}"))?;
        load(dir, boot.trim()).map_err(|error| format!("{}: {error}", dir.file(FILE).display()))
    });
    match loaded {
        Ok((key, source)) => {
            match source {
                KeySource::Read => tracing::info!(
                    "IMDSv2 token key read from the state directory: tokens issued on this node since it booted stay valid"
                ),
                KeySource::Made { replaced: None } => tracing::info!(
                    "IMDSv2 token key made and kept in the state directory (none there yet on this boot): tokens will stay valid across restarts"
                ),
                KeySource::Made { replaced: Some(why) } => tracing::warn!(
                    "IMDSv2 token key made and kept in the state directory in place of the one there ({why}): tokens issued with that one are refused"
                ),
            }
            TokenIssuer::with_key(&key)
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "IMDSv2 token key cannot be kept in the state directory: a new one is used, and tokens will not survive a restart (pods whose SDK keeps its token get 401 until it expires)"
            );
            TokenIssuer::new()
        }
    }
}

/// The key of boot `boot` in `dir`, read, or made and persisted.
///
/// # Errors
/// When the file cannot be read, removed or written.
pub fn load(dir: &StateDir, boot: &str) -> io::Result<([u8; KEY_LEN], KeySource)> {
    let mut replaced = None;
    // Another agent may write the file between our read and our write (a surge on a node
    // that has just booted): then its key is read on the next round.
    for _ in 0..3 {
        let why = match dir.read(FILE)? {
            Some(text) => match parse(&text) {
                Some((made_in, key)) if made_in == boot => return Ok((key, KeySource::Read)),
                Some(_) => Some("it was made before the node's last boot"),
                None => Some("it is unreadable"),
            },
            None if dir.file(FILE).symlink_metadata().is_ok() => Some("iamlet did not write it: owner or mode"),
            None => None,
        };
        if why.is_some() {
            dir.remove(FILE)?;
            replaced = why;
        }
        let key = random_key();
        if dir.create_new(FILE, render(boot, &key).as_bytes())? {
            return Ok((key, KeySource::Made { replaced }));
        }
    }
    Err(io::Error::other("the file kept changing while iamlet read it"))
}

fn render(boot: &str, key: &[u8; KEY_LEN]) -> String {
    format!("{HEADER}\nboot {boot}\nkey {}\n", STANDARD.encode(key))
}

/// The boot and the key, or `None` when the text is not a key file of this version.
fn parse(text: &[u8]) -> Option<(String, [u8; KEY_LEN])> {
    let text = std::str::from_utf8(text).ok()?;
    let mut lines = text.lines();
    (lines.next()? == HEADER).then_some(())?;
    let boot = lines.next()?.strip_prefix("boot ")?;
    let key = STANDARD.decode(lines.next()?.strip_prefix("key ")?).ok()?;
    Some((boot.to_string(), key.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use super::*;

    fn state() -> (tempfile::TempDir, StateDir) {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&root.path().join("iamlet")).unwrap();
        (root, dir)
    }

    #[test]
    fn a_successor_on_the_same_boot_reads_the_key_and_accepts_its_predecessors_tokens() {
        let (_root, dir) = state();
        let (key, source) = load(&dir, "boot-1").unwrap();
        assert_eq!(source, KeySource::Made { replaced: None });
        let ip = "10.0.0.1".parse().unwrap();
        let token = TokenIssuer::with_key(&key).issue(ip, Duration::from_secs(21600), SystemTime::now());

        let (again, source) = load(&dir, "boot-1").unwrap();
        assert_eq!((again, source), (key, KeySource::Read));
        assert_eq!(TokenIssuer::with_key(&again).verify(&token, ip, SystemTime::now()), Ok(()));
        let mode = std::fs::metadata(dir.file(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_reboot_discards_the_key() {
        let (_root, dir) = state();
        let (before, _) = load(&dir, "boot-1").unwrap();
        let (after, source) = load(&dir, "boot-2").unwrap();
        assert_ne!(before, after);
        assert_eq!(source, KeySource::Made { replaced: Some("it was made before the node's last boot") });
        assert_eq!(load(&dir, "boot-2").unwrap(), (after, KeySource::Read));
    }

    #[test]
    fn an_unreadable_or_planted_file_is_replaced() {
        let (_root, dir) = state();
        std::fs::write(dir.file(FILE), "garbage").unwrap();
        std::fs::set_permissions(dir.file(FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, source) = load(&dir, "boot-1").unwrap();
        assert_eq!(source, KeySource::Made { replaced: Some("it is unreadable") });

        // A key someone else could have read (or written): not used.
        let (key, _) = load(&dir, "boot-1").unwrap();
        std::fs::set_permissions(dir.file(FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (fresh, source) = load(&dir, "boot-1").unwrap();
        assert_ne!(key, fresh);
        assert_eq!(source, KeySource::Made { replaced: Some("iamlet did not write it: owner or mode") });
    }

    #[test]
    fn the_file_holds_the_boot_and_the_key_only() {
        let key = [7u8; KEY_LEN];
        let text = render("b0", &key);
        assert_eq!(parse(text.as_bytes()), Some(("b0".to_string(), key)));
        assert_eq!(parse(b"iamlet-token-key v1\nboot b0\nkey c2hvcnQ=\n"), None, "a short key");
        assert_eq!(parse(b"iamlet-token-key v9\nboot b0\n"), None);
    }
}
