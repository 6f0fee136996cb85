//! How current a watch's view is, for `/readyz` and `iamlet_pod_watch_stale_seconds`.
//!
//! A quiet watch and a dead one look alike: kube's watcher speaks only when something
//! changes, retries failed requests inside the client, and reports a successful re-watch
//! silently. So the view counts as current when it was last *confirmed*: by an event of the
//! watch, or by a cheap request to the API server that succeeded (the watcher's retries go to
//! the same server). Errors the watcher does report (a 403 after an RBAC change, a 410)
//! count too: a streak of them ends at the next event, or once none has come for longer than
//! the watcher's back-off ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

/// Longer than the watcher's longest back-off between retries (30 s).
pub const STREAK_GAP: Duration = Duration::from_secs(45);

#[derive(Debug)]
struct State {
    confirmed: Instant,
    /// The first reported error since the watch last delivered.
    failing_since: Option<Instant>,
    last_error: Option<Instant>,
}

/// One watch's health. Cheap to update from the watch task and read from anywhere.
#[derive(Debug)]
pub struct WatchHealth {
    state: Mutex<State>,
}

impl WatchHealth {
    pub fn new(now: Instant) -> Self {
        Self { state: Mutex::new(State { confirmed: now, failing_since: None, last_error: None }) }
    }

    /// The watch delivered something at `now`: the view is current.
    pub fn delivered(&self, now: Instant) {
        *self.state.lock() = State { confirmed: now, failing_since: None, last_error: None };
    }

    /// The API server answered at `now`: the watch can reach it.
    pub fn reachable(&self, now: Instant) {
        self.state.lock().confirmed = now;
    }

    /// The watch reported a failure at `now`.
    pub fn failed(&self, now: Instant) {
        let mut state = self.state.lock();
        state.failing_since.get_or_insert(now);
        state.last_error = Some(now);
    }

    /// How long the view may have been out of date at `now`.
    pub fn stale_for(&self, now: Instant) -> Duration {
        let state = self.state.lock();
        let unconfirmed = now.saturating_duration_since(state.confirmed);
        let failing = match (state.failing_since, state.last_error) {
            (Some(since), Some(last)) if now.saturating_duration_since(last) <= STREAK_GAP => {
                now.saturating_duration_since(since)
            }
            _ => Duration::ZERO,
        };
        unconfirmed.max(failing)
    }
}

/// Follows the pod watch's health for as long as `tasks` run: confirms the API server answers
/// often enough that a quiet watch never looks stale (a third of `stale_after`, at most every
/// 10 s), keeps `gauge` (`iamlet_pod_watch_stale_seconds`) current, and returns a handle
/// that says whether the view is current, stale for no longer than `stale_after` (a
/// readiness condition).
pub fn follow(
    client: kube::Client,
    health: Arc<WatchHealth>,
    stale_after: Duration,
    gauge: prometheus_client::metrics::gauge::Gauge,
    tasks: &mut tokio::task::JoinSet<()>,
) -> watch::Receiver<bool> {
    let confirm_every = (stale_after / 3).min(Duration::from_secs(10));
    tasks.spawn(confirm_reachable(client, health.clone(), confirm_every));
    let (current, handle) = watch::channel(true);
    tasks.spawn(export(health, gauge, stale_after, current));
    handle
}

/// Confirms every `period` that the API server answers (`GET /version`, bounded by
/// `period`), so a quiet but healthy watch never looks stale.
async fn confirm_reachable(client: kube::Client, health: std::sync::Arc<WatchHealth>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Ok(Ok(_)) = tokio::time::timeout(period, client.apiserver_version()).await {
            health.reachable(Instant::now());
        }
    }
}

/// Every second, sets `gauge` to how stale the view is and `current` to whether that is
/// within `stale_after`.
async fn export(
    health: Arc<WatchHealth>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    stale_after: Duration,
    current: watch::Sender<bool>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        let stale_for = health.stale_for(Instant::now());
        gauge.set(stale_for.as_secs() as i64);
        current.send_if_modified(|current| std::mem::replace(current, stale_for <= stale_after) != *current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_view_is_as_old_as_its_last_confirmation() {
        let t0 = Instant::now();
        let health = WatchHealth::new(t0);
        assert_eq!(health.stale_for(t0 + secs(5)), secs(5));
        health.reachable(t0 + secs(10));
        assert_eq!(health.stale_for(t0 + secs(12)), secs(2));
        health.delivered(t0 + secs(20));
        assert_eq!(health.stale_for(t0 + secs(20)), Duration::ZERO);
    }

    #[test]
    fn a_streak_of_reported_failures_counts_even_while_the_server_answers() {
        let t0 = Instant::now();
        let health = WatchHealth::new(t0);
        health.failed(t0);
        health.reachable(t0 + secs(20));
        health.failed(t0 + secs(20));
        assert_eq!(health.stale_for(t0 + secs(30)), secs(30), "403s while /version answers");
        health.reachable(t0 + secs(70));
        assert_eq!(health.stale_for(t0 + secs(70)), Duration::ZERO, "no failure for longer than the back-off");
        health.failed(t0 + secs(71));
        health.delivered(t0 + secs(72));
        assert_eq!(health.stale_for(t0 + secs(72)), Duration::ZERO);
    }
}
