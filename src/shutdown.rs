//! Signals: the first SIGTERM or SIGINT drains and exits cleanly; a second one aborts (see
//! [`crate::app::run`], which returns how the agent stopped; the binary picks the exit code).

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the next SIGTERM or SIGINT, with the signal's name.
pub async fn signalled() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
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
