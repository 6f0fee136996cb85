//! Reading libcni's result cache directory (`--cni-results-dir`), and noticing when it changes.
//!
//! libcni writes a record when the CNI's ADD succeeds, before the runtime starts the pod's
//! containers, and deletes it on DEL, when the pod's address is released. inotify says so at
//! once; a full read every sync period backs it up (a missed event, a directory that appears
//! late).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::index::PortIndex;
use super::record::{self, RecordError};

/// A record larger than this is not libcni's (one is a few KiB).
const MAX_RECORD: u64 = 1 << 20;

/// One read of the directory.
#[derive(Debug, Default)]
pub struct Read {
    pub index: PortIndex,
    /// Files that hold no usable port, and why (logged once each by the caller).
    pub unusable: Vec<(String, RecordError)>,
}

/// Reads every record in `dir`. Errors: the directory cannot be listed. A file that vanishes
/// while being read (its pod deleted) is skipped.
pub fn read(dir: &Path) -> std::io::Result<Read> {
    let mut records = Vec::new();
    let mut unusable = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(metadata) = entry.metadata() else { continue };
        if !metadata.is_file() || name.starts_with('.') {
            continue;
        }
        if metadata.len() > MAX_RECORD {
            unusable.push((name, RecordError::Malformed(format!("{} bytes", metadata.len()))));
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path()) else { continue };
        match record::parse(&bytes) {
            Ok(record) => records.push((name, metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH), record)),
            Err(error) => unusable.push((name, error)),
        }
    }
    Ok(Read { index: PortIndex::build(records), unusable })
}

/// Sends `()` on `changed` whenever something in `dir` is written, created, moved or deleted,
/// and every `period` regardless. Runs until the receiver goes away.
pub async fn watch(dir: PathBuf, period: Duration, changed: mpsc::Sender<()>) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = None;
    let mut warned = false;
    loop {
        if events.is_none() {
            match inotify_stream(&dir) {
                Ok(stream) => events = Some(stream),
                Err(error) if !warned => {
                    warned = true;
                    tracing::debug!(dir = %dir.display(), %error, "cannot watch the CNI's records; reading them every sync period");
                }
                Err(_) => {}
            }
        }
        let event = async {
            match events.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            next = event => {
                if !matches!(next, Some(Ok(_))) {
                    // The directory went away (or inotify failed): watch it again once it is back.
                    events = None;
                }
            }
        }
        if changed.send(()).await.is_err() {
            return;
        }
    }
}

type Events = inotify::EventStream<Vec<u8>>;

fn inotify_stream(dir: &Path) -> std::io::Result<Events> {
    use inotify::{Inotify, WatchMask};
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        // Not CREATE: a file just created is still empty (libcni writes, then closes).
        WatchMask::CLOSE_WRITE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF,
    )?;
    inotify.into_event_stream(vec![0; 4096])
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"{"kind":"cniCacheV1","cniArgs":[["K8S_POD_NAMESPACE","ns"],["K8S_POD_NAME","web"]],
        "result":{"interfaces":[{"name":"veth1"},{"name":"eth0","mac":"0a:58:00:00:00:05","sandbox":"/n"}],
        "ips":[{"interface":1,"address":"10.0.0.5/24"}]}}"#;

    #[test]
    fn reads_each_record_and_says_which_files_hold_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cbr0-4b1f-eth0"), RECORD).unwrap();
        std::fs::write(dir.path().join("cbr0-dead-eth0"), "{").unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let read = read(dir.path()).unwrap();
        assert_eq!(read.index.owner(&"10.0.0.5".parse().unwrap()).unwrap().port, "veth1");
        assert_eq!(read.unusable.len(), 1);
        assert_eq!(read.unusable[0].0, "cbr0-dead-eth0");
        assert!(super::read(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn a_new_record_is_noticed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(watch(dir.path().to_path_buf(), Duration::from_secs(3600), tx));
        rx.recv().await.unwrap(); // the interval's first tick
        std::fs::write(dir.path().join("cbr0-4b1f-eth0"), RECORD).unwrap();
        rx.recv().await.expect("an event for the write, long before the hour's tick");
    }
}
