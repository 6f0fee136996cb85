//! The node's budget of AssumeRole calls (`--sts-max-rps`, `--sts-burst`): a token bucket
//! every call takes one token from, retries included; and the pace of the calls no pod waits
//! for (refreshes, prefetches), which adapts to STS's throttling.
//!
//! STS limits AssumeRole per account and region (about 600 calls/s, users report), and every
//! node of a fleet calls it. A node that restarts, or whose STS throttles, must not add a
//! burst of its own on top: with the budget, a node never makes more than `--sts-burst` calls
//! at once nor more than `--sts-max-rps` a second over time, whatever its pods do. The queue
//! (`queue`) decides who gets the next token: a pod's request first.
//!
//! No fixed rate fits every fleet: 10 calls/s is a node's fair share of 600/s in a fleet of
//! 60 nodes, and 50 times too much in one of 5,000 where every agent restarts at once. So
//! background calls also keep to a pace, additive increase and multiplicative decrease as TCP
//! shares a link (and the AWS SDKs' adaptive retry mode shares a service): it starts at
//! `--sts-max-rps`, grows by [`PACE_GROWTH`] a second while STS accepts what it is sent (by
//! `PACE_GROWTH / pace` with each accepted call, as TCP's window grows by one segment a round
//! trip), and halves when STS throttles (at most once per [`DECREASE_EVERY`], one episode),
//! down to [`MIN_PACE`], then holds for [`HOLD_AFTER_DECREASE`]. A fleet's agents then share
//! the account's limit among themselves without knowing each other, and keep the headroom a
//! pod's request needs: a request's first call keeps to the budget alone, and its retries
//! take background calls' places ([`RETRY_QUOTA`], `StsQueue::retry_now`). Refreshes are due
//! 22.5 to 30 minutes before expiry and tried until 5 minutes before, so a slow pace delays
//! them without a pod noticing.
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

/// The lowest pace: a node's share of 600 calls/s among 30,000 nodes.
pub const MIN_PACE: f64 = 0.02;
/// How fast the pace grows while STS accepts every call, in calls per second per second: a
/// fleet of 5,000 nodes with work to do adds 5 calls/s each second, so it finds the account's
/// limit with a small overshoot, and a lone node restarted with 110 keys to fetch has them in
/// about 7 minutes (a pod that asks meanwhile is served by its request).
pub const PACE_GROWTH: f64 = 0.001;
/// The most retries of requests a node may make ahead of its pace: each takes the place of
/// a background call, and the pace's bucket may owe this many. While STS accepts the node's
/// calls, a throttled request is retried at once; while STS throttles the account, the pace
/// halves and the retries come back no faster than it, so throttled nodes do not multiply
/// their calls. (A quota refilled by successes alone, as the AWS SDKs' retry quota, ran dry
/// in the minutes after a crash of every agent, when each node's few calls a minute are
/// accepted: every pod whose first call was throttled then failed.)
pub const RETRY_QUOTA: f64 = 10.0;
/// After a halving the pace holds this long before it grows again: the fleet's other nodes
/// are halving too, and growing at once would find the limit again within seconds.
pub const HOLD_AFTER_DECREASE: Duration = Duration::from_secs(60);
/// Throttled answers within this of a decrease belong to the same episode: one halving.
pub const DECREASE_EVERY: Duration = Duration::from_secs(2);

/// A token bucket refilled at `rate`, holding at most `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
    }

    /// Whether a token is there at `now` (rounding may leave a hair less than one at the
    /// instant `next_token` names).
    fn has(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0 - ROUNDING
    }

    fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let missing = (1.0 - ROUNDING - self.tokens).max(0.0);
        // Rounded up to the next microsecond: never `now` while no token is there.
        let wait = Duration::from_micros((missing / self.rate * 1e6).ceil() as u64);
        now + wait.min(Duration::from_secs(3600))
    }
}

/// The node's budget, and the background's adaptive pace within it.
#[derive(Debug, Clone)]
pub struct Budget {
    /// `--sts-max-rps` and `--sts-burst`: every call.
    ceiling: Bucket,
    /// The pace of refreshes and prefetches (at most one second's worth at once).
    background: Bucket,
    /// When the pace was last halved.
    decreased: Option<Instant>,
}

impl Budget {
    /// A full bucket at `now`, the background's pace at `--sts-max-rps`.
    pub fn new(settings: BudgetSettings, now: Instant) -> Self {
        let rate = settings.rate.max(f64::MIN_POSITIVE);
        let ceiling = Bucket { rate, burst: settings.burst.max(1.0), tokens: settings.burst.max(1.0), refilled: now };
        // One call at once to begin with: every agent may be starting now (a crash of all).
        let background = Bucket { rate, burst: rate.max(1.0), tokens: 1.0, refilled: now };
        Self { ceiling, background, decreased: None }
    }

    /// Takes a token at `now` for a request (`background` false) or a refresh or prefetch,
    /// if there is one.
    pub fn take(&mut self, now: Instant, background: bool) -> bool {
        let ready = self.ceiling.has(now) && (!background || self.background.has(now));
        if ready {
            self.ceiling.tokens -= 1.0;
            if background {
                self.background.tokens -= 1.0;
            }
        }
        ready
    }

    /// Takes a token at `now` for a request's retry, and the place of a background call: the
    /// pace's bucket may owe up to [`RETRY_QUOTA`] calls, which refreshes and prefetches then
    /// wait out. A throttled node's retries thus replace calls it would have made anyway,
    /// and come back at the pace STS accepts from it.
    pub fn take_retry(&mut self, now: Instant) -> bool {
        self.background.refill(now);
        let ready = self.background.tokens >= 1.0 - RETRY_QUOTA - ROUNDING && self.ceiling.has(now);
        if ready {
            self.ceiling.tokens -= 1.0;
            self.background.tokens -= 1.0;
        }
        ready
    }

    /// Gives back a token taken for a call that was not made.
    pub fn give_back(&mut self, background: bool) {
        self.ceiling.tokens = (self.ceiling.tokens + 1.0).min(self.ceiling.burst);
        if background {
            self.background.tokens = (self.background.tokens + 1.0).min(self.background.burst);
        }
    }

    /// When the next token for a request (or a background call) will be there, from `now`.
    pub fn next_token(&mut self, now: Instant, background: bool) -> Instant {
        let ceiling = self.ceiling.next_token(now);
        match background {
            true => ceiling.max(self.background.next_token(now)),
            false => ceiling,
        }
    }

    /// STS accepted a call at `now`: the pace grows.
    pub fn accepted(&mut self, now: Instant) {
        self.background.refill(now);
        if self.decreased.is_some_and(|at| now.saturating_duration_since(at) < HOLD_AFTER_DECREASE) {
            return;
        }
        let pace = self.background.rate;
        self.background.rate = (pace + PACE_GROWTH / pace).min(self.ceiling.rate);
        self.background.burst = self.background.rate.max(1.0);
    }

    /// STS throttled a call at `now`: the pace halves, once per episode.
    pub fn throttled(&mut self, now: Instant) {
        if self.decreased.is_some_and(|at| now.saturating_duration_since(at) < DECREASE_EVERY) {
            return;
        }
        self.decreased = Some(now);
        self.background.refill(now);
        self.background.rate = (self.background.rate / 2.0).max(MIN_PACE.min(self.ceiling.rate));
        self.background.burst = self.background.rate.max(1.0);
        self.background.tokens = self.background.tokens.min(self.background.burst);
    }

    /// Tokens held at `now` (for `iamlet_sts_budget_tokens`).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.ceiling.refill(now);
        self.ceiling.tokens
    }

    /// The background's pace, in calls per second (for `iamlet_sts_background_pace`).
    pub fn pace(&self) -> f64 {
        self.background.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut budget = Budget::new(BudgetSettings { rate: 10.0, burst: 3.0 }, start);
        assert!((0..3).all(|_| budget.take(start, false)), "the burst at once");
        assert!(!budget.take(start, false));
        assert_eq!(budget.next_token(start, false), start + Duration::from_millis(100));
        assert!(!budget.take(start + Duration::from_millis(99), false));
        assert!(budget.take(start + Duration::from_millis(100), false));
        // Over a second of steady demand, the rate.
        let mut taken = 0;
        for ms in 101..=1150 {
            taken += usize::from(budget.take(start + Duration::from_millis(ms), false));
        }
        assert_eq!(taken, 10);
        budget.give_back(false);
        assert!(budget.tokens(start + Duration::from_millis(1150)) >= 1.0);
        // A long quiet spell fills the bucket to the burst, no more.
        assert_eq!(budget.tokens(start + Duration::from_secs(60)), 3.0);
    }

    #[test]
    fn the_background_keeps_a_pace_that_grows_with_acceptance_and_halves_when_throttled() {
        let start = Instant::now();
        let mut budget = Budget::new(BudgetSettings { rate: 10.0, burst: 20.0 }, start);
        assert!(budget.take(start, true), "one background call at once to begin with");
        assert!(!budget.take(start, true) && budget.take(start, false), "a request keeps to the budget alone");
        assert_eq!(budget.next_token(start, true), start + Duration::from_millis(100));
        for s in 0..4 {
            budget.throttled(start + DECREASE_EVERY * s);
        }
        assert_eq!(budget.pace(), 10.0 / 16.0);
        // After the hold, a minute of calls at the pace, all accepted: about PACE_GROWTH × 60
        // more.
        budget.accepted(start + DECREASE_EVERY * 4);
        assert_eq!(budget.pace(), 10.0 / 16.0, "held after a halving");
        let start = start + DECREASE_EVERY * 4 + HOLD_AFTER_DECREASE;
        let before = budget.pace();
        let mut at = start;
        while at < start + Duration::from_secs(60) {
            budget.accepted(at);
            at += Duration::from_secs_f64(1.0 / budget.pace());
        }
        let grown = budget.pace();
        assert!((grown - before - 60.0 * PACE_GROWTH).abs() < 0.01, "{grown}");
        let start = at + DECREASE_EVERY;
        budget.throttled(start);
        let halved = budget.pace();
        assert!((halved - grown / 2.0).abs() < 1e-9, "{halved}");
        budget.throttled(start + Duration::from_millis(500));
        assert_eq!(budget.pace(), halved, "the same episode: one halving");
        for s in 1..=20 {
            budget.throttled(start + DECREASE_EVERY * s);
        }
        assert_eq!(budget.pace(), MIN_PACE, "never below the floor");
        let later = start + DECREASE_EVERY * 21 + HOLD_AFTER_DECREASE;
        for _ in 0..1_000_000 {
            budget.accepted(later);
        }
        assert_eq!(budget.pace(), 10.0, "never above --sts-max-rps");
    }

    #[test]
    fn a_requests_retries_take_background_calls_places_owing_at_most_the_quota() {
        let start = Instant::now();
        let mut budget = Budget::new(BudgetSettings { rate: 10.0, burst: 20.0 }, start);
        let retries = (0..100).filter(|_| budget.take_retry(start)).count();
        assert_eq!(retries as f64, 1.0 + RETRY_QUOTA, "the pace's one token, then the quota owed");
        assert_eq!(budget.tokens(start), 20.0 - 11.0, "each retry took a token of the budget too");
        assert_eq!(
            budget.next_token(start, true),
            start + Duration::from_millis(1100),
            "the background waits the debt out"
        );
        // Throttled: the debt is paid at the halved pace, and so come the next retries.
        budget.throttled(start);
        assert!(!budget.take_retry(start + Duration::from_millis(199)));
        assert!(budget.take_retry(start + Duration::from_millis(200)), "one retry per call of the pace (5/s)");
        assert_eq!(budget.next_token(start + Duration::from_millis(200), true), start + Duration::from_millis(2400));
    }
}
