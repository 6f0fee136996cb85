//! Wall-clock time for credentials. STS's `Expiration` is wall-clock time, so the agent
//! compares it with [`SystemTime`]; tests and the fleet simulation
//! (`cargo run --example fleet`) run hours on tokio's paused clock in seconds, and need the
//! credential code to see those hours pass. [`Clock::FollowingTokio`] does: the wall time it
//! was made at plus tokio's time elapsed since.

use std::time::SystemTime;

/// Where "now" comes from.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// The system's wall clock: what the agent uses.
    #[default]
    System,
    /// `wall` plus the tokio time elapsed since `at` (which a paused runtime advances).
    FollowingTokio { wall: SystemTime, at: tokio::time::Instant },
}

impl Clock {
    /// A clock that starts at the system's time now and then follows tokio's.
    pub fn following_tokio() -> Self {
        Clock::FollowingTokio { wall: SystemTime::now(), at: tokio::time::Instant::now() }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::FollowingTokio { wall, at } => *wall + at.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_following_clock_moves_with_paused_time_only() {
        let clock = Clock::following_tokio();
        let start = clock.now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now().duration_since(start).unwrap(), Duration::from_secs(3600));
        let system = Clock::System.now();
        assert!(system.duration_since(start).unwrap_or_default() < Duration::from_secs(60), "not the system's");
    }
}
