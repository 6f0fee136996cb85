//! Signals: the first SIGTERM or SIGINT drains and exits cleanly; a second one aborts.

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

/// After the first signal: a second one exits at once, without waiting for the drain.
pub fn abort_on_second_signal() {
    tokio::spawn(async {
        let name = signalled().await;
        tracing::warn!(signal = name, "second signal: exiting without draining");
        std::process::exit(130);
    });
}
