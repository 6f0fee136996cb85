//! The node's budget of AssumeRole calls (`--sts-max-rps`, `--sts-burst`): a token bucket
//! every call takes one token from, retries included.
//!
//! STS limits AssumeRole per account and region (about 600 calls/s, users report), and every
//! node of a fleet calls it. A node that restarts, or whose STS throttles, must not add a
//! burst of its own on top: with the budget, a node never makes more than `--sts-burst` calls
//! at once nor more than `--sts-max-rps` a second over time, whatever its pods do. The queue
//! (`queue`) decides who gets the next token: a pod's request first.
//!
//! Pure: the clock is passed in (tokio's, so it can be paused).

use std::time::Duration;

use tokio::time::Instant;

/// How much less than a whole token still counts as one (floating-point rounding).
const ROUNDING: f64 = 1e-9;

/// The budget's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    /// Tokens added per second: the most calls a second over time.
    pub rate: f64,
    /// The most tokens held: the most calls at once after a quiet spell.
    pub burst: f64,
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct Budget {
    settings: BudgetSettings,
    tokens: f64,
    refilled: Instant,
}

impl Budget {
    /// A full bucket at `now`.
    pub fn new(settings: BudgetSettings, now: Instant) -> Self {
        let burst = settings.burst.max(1.0);
        let settings = BudgetSettings { rate: settings.rate.max(f64::MIN_POSITIVE), burst };
        Self { settings, tokens: burst, refilled: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.settings.rate).min(self.settings.burst);
        self.refilled = now;
    }

    /// Takes a token at `now` if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        // At the instant `next_token` names, rounding may leave a hair less than a token.
        if self.tokens >= 1.0 - ROUNDING {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken for a call that was not made.
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.settings.burst);
    }

    /// When the next token will be there, from `now`.
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let missing = (1.0 - ROUNDING - self.tokens).max(0.0);
        // Rounded up to the next microsecond: never `now` while no token is there.
        let wait = Duration::from_micros((missing / self.settings.rate * 1e6).ceil() as u64);
        now + wait.min(Duration::from_secs(3600))
    }

    /// Tokens held at `now` (for `iamlet_sts_budget_tokens`).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut budget = Budget::new(BudgetSettings { rate: 10.0, burst: 3.0 }, start);
        assert!((0..3).all(|_| budget.take(start)), "the burst at once");
        assert!(!budget.take(start));
        assert_eq!(budget.next_token(start), start + Duration::from_millis(100));
        assert!(!budget.take(start + Duration::from_millis(99)));
        assert!(budget.take(start + Duration::from_millis(100)));
        // Over a second of steady demand, the rate.
        let mut taken = 0;
        for ms in 101..=1150 {
            taken += usize::from(budget.take(start + Duration::from_millis(ms)));
        }
        assert_eq!(taken, 10);
        budget.give_back();
        assert!(budget.tokens(start + Duration::from_millis(1150)) >= 1.0);
        // A long quiet spell fills the bucket to the burst, no more.
        assert_eq!(budget.tokens(start + Duration::from_secs(60)), 3.0);
    }
}
