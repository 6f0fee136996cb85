//! Which sessions pods asked for in the last minutes, kept in the state directory, so that
//! after a crash the prefetches of the pods most likely to ask again soon go first.
//!
//! A crash has no hand-over: the next agent starts with nothing cached and prefetches every
//! pod on the node, a quarter of `--sts-concurrency` at a time. A pod that asks meanwhile
//! goes first anyway (a request has priority at STS), but it waits one AssumeRole. The pods
//! that asked in the last minutes (a CLI in a loop, a job starting processes, a client
//! without a credential cache) are those likely to ask in the seconds after the start:
//! fetching theirs first lets them find their credentials in memory.
//!
//! The file (`recent-sessions`, 0600 in the 0700 directory) is a hint, never a credential:
//! a header line, then one line per session, `<unix seconds> <session>` (its
//! [`crate::resolve::CredentialKey::session_id`]: the session name, and in a shared scope
//! the role's ARN before it). It is replaced
//! whole, at most every [`PERSIST_EVERY`], when something changed; lines older than
//! [`WINDOW`], from the future, or unreadable are skipped, so a file of an earlier boot or of
//! another version costs nothing but the order.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::state::StateDir;

/// The file in the state directory.
pub const FILE: &str = "recent-sessions";
const HEADER: &str = "iamlet-recent-sessions v1";
/// How long an ask counts as recent.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// How often what changed is written: what a kill -9 loses at most.
pub const PERSIST_EVERY: Duration = Duration::from_secs(10);
/// An ask renews a session's time in the file only when the time written is older than
/// this: a pod asking every second does not make a write every ten.
const RENEW_AFTER: Duration = Duration::from_secs(60);
/// Most sessions kept: pods on one node, with room to spare.
const CAPACITY: usize = 20_000;
/// A time this far ahead of the clock is a clock step back, not a recent ask: skipped.
const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// The sessions asked for recently, with when each last was. Cheap to consult; every method
/// takes the lock once.
#[derive(Debug, Default)]
pub struct RecentAsks {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    asked: HashMap<Arc<str>, SystemTime>,
    /// Something the file does not say yet.
    changed: bool,
}

impl RecentAsks {
    /// A pod asked for the credentials of `session` at `at`.
    pub fn asked(&self, session: &Arc<str>, at: SystemTime) {
        let mut state = self.state.lock();
        let state = &mut *state;
        let len = state.asked.len();
        match state.asked.get_mut(session) {
            Some(last) if at.duration_since(*last).is_ok_and(|since| since >= RENEW_AFTER) => {
                *last = at;
                state.changed = true;
            }
            None if len < CAPACITY => {
                state.asked.insert(session.clone(), at);
                state.changed = true;
            }
            Some(_) | None => {}
        }
    }

    /// Whether a pod asked for `session` within [`WINDOW`] before `now`.
    pub fn is_recent(&self, session: &str, now: SystemTime) -> bool {
        self.state.lock().asked.get(session).is_some_and(|at| recent(*at, now))
    }

    /// Adds what an earlier agent wrote (see [`load`]), without marking it changed.
    pub fn seed(&self, entries: Vec<(Arc<str>, SystemTime)>) {
        let mut state = self.state.lock();
        for (session, at) in entries {
            if state.asked.len() >= CAPACITY {
                break;
            }
            let last = state.asked.entry(session).or_insert(at);
            *last = (*last).max(at);
        }
    }

    /// The file's text when something changed since the last call, the sessions that are no
    /// longer recent at `now` left out (and forgotten).
    fn changes(&self, now: SystemTime) -> Option<String> {
        let mut state = self.state.lock();
        let before = state.asked.len();
        state.asked.retain(|_, at| recent(*at, now));
        if !state.changed && state.asked.len() == before {
            return None;
        }
        state.changed = false;
        Some(render(&state.asked))
    }
}

fn recent(at: SystemTime, now: SystemTime) -> bool {
    match now.duration_since(at) {
        Ok(ago) => ago < WINDOW,
        Err(ahead) => ahead.duration() <= CLOCK_SLACK,
    }
}

fn render(asked: &HashMap<Arc<str>, SystemTime>) -> String {
    let mut text = format!("{HEADER}\n");
    for (session, at) in asked {
        let seconds = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        text.push_str(&format!("{seconds} {session}\n"));
    }
    text
}

/// The sessions in `text` asked within [`WINDOW`] before `now`; nothing when the text is not
/// a file of this version.
fn parse(text: &[u8], now: SystemTime) -> Vec<(Arc<str>, SystemTime)> {
    let Ok(text) = std::str::from_utf8(text) else { return Vec::new() };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Vec::new();
    }
    lines
        .filter_map(|line| {
            let (seconds, session) = line.split_once(' ')?;
            let at = UNIX_EPOCH.checked_add(Duration::from_secs(seconds.parse().ok()?))?;
            let plausible = !session.is_empty() && !session.contains(char::is_whitespace);
            (plausible && recent(at, now)).then(|| (Arc::from(session), at))
        })
        .take(CAPACITY)
        .collect()
}

/// The sessions an earlier agent on this node saw asked within [`WINDOW`] before `now`.
///
/// # Errors
/// When the file is there and cannot be read.
pub fn load(dir: &StateDir, now: SystemTime) -> io::Result<Vec<(Arc<str>, SystemTime)>> {
    Ok(dir.read(FILE)?.map(|text| parse(&text, now)).unwrap_or_default())
}

/// Writes what changed in `recent` to `dir` every [`PERSIST_EVERY`], until `retired` says
/// this agent handed over (its successor writes from then on). A failure is said once, at
/// warn: the order of the prefetches after a crash is all it costs.
pub async fn persist(recent: Arc<RecentAsks>, dir: StateDir, retired: impl Fn() -> bool) {
    let mut warned = false;
    loop {
        tokio::time::sleep(PERSIST_EVERY).await;
        if retired() {
            return;
        }
        let Some(text) = recent.changes(SystemTime::now()) else { continue };
        let dir = dir.clone();
        let written = tokio::task::spawn_blocking(move || dir.replace(FILE, text.as_bytes())).await;
        match written {
            Ok(Ok(())) => warned = false,
            Ok(Err(error)) if !warned => {
                warned = true;
                tracing::warn!(%error, file = FILE, "cannot keep the recently asked sessions in the state directory: after a crash, prefetches go in any order");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn an_ask_is_recent_for_the_window_and_written_once_changed() {
        let recent = RecentAsks::default();
        let session: Arc<str> = "shop.web".into();
        assert_eq!(recent.changes(at(1_000)), None, "nothing asked, nothing written");
        recent.asked(&session, at(1_000));
        assert!(recent.is_recent("shop.web", at(1_000) + WINDOW - Duration::from_secs(1)));
        assert!(!recent.is_recent("shop.web", at(1_000) + WINDOW));
        assert!(!recent.is_recent("shop.other", at(1_000)));
        let text = recent.changes(at(1_001)).expect("a new session is written");
        assert_eq!(text, "iamlet-recent-sessions v1\n1000 shop.web\n");
        recent.asked(&session, at(1_030));
        assert_eq!(recent.changes(at(1_031)), None, "asked again within a minute: the file is true enough");
        recent.asked(&session, at(1_060));
        assert!(recent.changes(at(1_061)).unwrap().contains("1060 shop.web"));
        assert_eq!(recent.changes(at(1_060) + WINDOW).as_deref(), Some("iamlet-recent-sessions v1\n"), "aged out");
        assert!(!recent.is_recent("shop.web", at(1_060)), "and forgotten");
    }

    #[test]
    fn what_an_earlier_agent_wrote_is_read_back_within_the_window() {
        let recent = RecentAsks::default();
        for (session, seconds) in [("a.one", 5_000), ("b.two", 5_500)] {
            recent.asked(&session.into(), at(seconds));
        }
        let text = recent.changes(at(5_600)).unwrap();
        let now = at(5_000) + WINDOW + Duration::from_secs(1);
        let read = parse(text.as_bytes(), now);
        assert_eq!(read, [(Arc::from("b.two"), at(5_500))], "a.one asked too long ago");

        let next = RecentAsks::default();
        next.seed(read);
        assert!(next.is_recent("b.two", now));
        assert_eq!(next.changes(now), None, "what was read is not written back unchanged");
    }

    #[test]
    fn a_file_of_another_version_or_with_bad_lines_costs_only_those_lines() {
        let now = at(10_000);
        assert!(parse(b"iamlet-recent-sessions v2\n9999 a.b\n", now).is_empty());
        assert!(parse(b"\xff\xfe", now).is_empty());
        let text = b"iamlet-recent-sessions v1\n9999 a.b\nnonsense\n9998 \n99x9 c.d\n9997 e.f g\n20000 h.i\n9990 j.k\n";
        let read: Vec<_> = parse(text, now).into_iter().map(|(session, _)| session.to_string()).collect();
        assert_eq!(read, ["a.b", "j.k"]);
    }

    #[test]
    fn the_file_is_replaced_whole_and_read_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&root.path().join("iamlet")).unwrap();
        let now = SystemTime::now();
        assert!(load(&dir, now).unwrap().is_empty(), "no file yet");
        let recent = RecentAsks::default();
        recent.asked(&"shop.web".into(), now);
        dir.replace(FILE, recent.changes(now).unwrap().as_bytes()).unwrap();
        recent.asked(&"shop.api".into(), now);
        dir.replace(FILE, recent.changes(now).unwrap().as_bytes()).unwrap();
        let mut read: Vec<_> = load(&dir, now).unwrap().into_iter().map(|(session, _)| session.to_string()).collect();
        read.sort();
        assert_eq!(read, ["shop.api", "shop.web"]);
    }
}
