//! Signals: the first SIGTERM or SIGINT drains and exits cleanly; a second one aborts (see
//! [`crate::app::run`], which returns how the agent stopped; the binary picks the exit code).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM and SIGINT, caught from the moment they are installed: a signal that arrives
/// between two waits is kept for the next one, never lost.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves on the next SIGTERM or SIGINT, with the signal's name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// How the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// In-flight requests finished (or the grace period ran out) and the rules were kept or
    /// removed as configured.
    Drained,
    /// A second signal came during the drain: the process should exit at once (status 130,
    /// as a shell reports an interrupt), leaving the rules in place.
    Aborted,
}
