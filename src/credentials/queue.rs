//! The queue in front of STS: at most `--sts-concurrency` AssumeRole calls at once, of which
//! prefetches and refreshes take at most a quarter, and when calls wait, a pod's request
//! goes first, then refreshes, then the prefetches of pods that asked in the last minutes
//! (see `recent`), then the other prefetches.
//!
//! A FIFO made the first request after a restart wait behind the prefetches of every pod on
//! the node (half a second with 110 pods). Here a request is served next, and a request for a
//! key whose prefetch is already waiting promotes that prefetch, since the request will take
//! its result (the cache runs one fetch per key).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::budget::{Budget, BudgetSettings};

use crate::resolve::CredentialKey;

/// Why an AssumeRole call is made, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A pod is waiting for the answer.
    Demand,
    /// Cached credentials are due for renewal; pods are served the old ones meanwhile.
    Refresh,
    /// A pod that asked in the minutes before the agent started (or since): likely to ask
    /// again soon, so fetched before the other pods.
    PrefetchAsked,
    /// A pod appeared (or the agent started): fetched before it asks.
    Prefetch,
}

const PRIORITIES: usize = 4;

/// The share of `--sts-concurrency` prefetches and refreshes may use together: the rest is
/// kept for requests. On a cold start every pod's prefetch is queued at once; a request then
/// finds a free turn, and STS (moto here, a shared endpoint in life) not busy with a burst.
pub const BACKGROUND_SHARE: usize = 4;

#[derive(Debug)]
struct Waiter {
    id: u64,
    key: CredentialKey,
    /// Sent the turn, and whether it counts as background work.
    turn: oneshot::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    /// Calls that may start now.
    free: usize,
    /// Prefetches and refreshes under way, and how many may be.
    background: usize,
    background_limit: usize,
    /// `--sts-max-rps` and `--sts-burst`; none: unlimited (tests).
    budget: Option<Budget>,
    /// When a task wakes the queue for the budget's next token, if one will.
    wake_at: Option<Instant>,
    /// Waiting calls by priority, each in arrival order.
    waiting: [VecDeque<Waiter>; PRIORITIES],
    /// Keys requests are waiting for: how many requests, and until when the most patient
    /// one may retry.
    demanded: HashMap<CredentialKey, (usize, Instant)>,
    next_id: u64,
}

impl State {
    /// Takes a token of the budget for a request or a background call (or a request's
    /// retry), if there is one (always without a budget).
    fn take_token(&mut self, now: Instant, background: bool) -> bool {
        self.budget.as_mut().is_none_or(|budget| budget.take(now, background))
    }

    /// Hands free turns, and the budget's tokens, to the most urgent waiters. Returns when
    /// the next token will be there if waiters could have a turn but the budget is spent.
    fn dispatch(&mut self) -> Option<Instant> {
        let now = Instant::now();
        while self.free > 0 {
            let queue = match self.waiting.iter().position(|queue| !queue.is_empty()) {
                Some(0) => 0,
                Some(queue) if self.background < self.background_limit => queue,
                _ => return None,
            };
            let background = queue != Priority::Demand as usize;
            if !self.take_token(now, background) {
                return self.budget.as_mut().map(|budget| budget.next_token(now, background));
            }
            let waiter = self.waiting[queue].pop_front().expect("not empty");
            if waiter.turn.send(background).is_ok() {
                self.free -= 1;
                self.background += usize::from(background);
            } else if let Some(budget) = &mut self.budget {
                budget.give_back(background);
            }
        }
        None
    }
}

/// Dispatches, and when the budget holds waiters back, has a task dispatch again once its
/// next token is there (one such task at a time).
fn dispatch(shared: &Arc<Mutex<State>>, state: &mut State) {
    let Some(at) = state.dispatch() else { return };
    if state.wake_at.is_some() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    state.wake_at = Some(at);
    let shared = shared.clone();
    runtime.spawn(async move {
        tokio::time::sleep_until(at).await;
        let mut state = shared.lock();
        state.wake_at = None;
        dispatch(&shared, &mut state);
    });
}

/// Gives a finished call's turn back (a background one's to the background too), then hands
/// free turns to the most urgent waiters still there.
fn release(shared: &Arc<Mutex<State>>, state: &mut State, background: bool) {
    if background {
        state.background -= 1;
    }
    state.free += 1;
    dispatch(shared, state);
}

/// The STS call queue. Cheap to share.
#[derive(Debug, Clone)]
pub struct StsQueue {
    state: Arc<Mutex<State>>,
    /// Woken whenever a request starts waiting for a key (see [`StsQueue::demand`]).
    demands: Arc<Notify>,
}

impl StsQueue {
    /// A queue letting `concurrency` calls run at once (at least one), prefetches and
    /// refreshes a quarter of them (at least one), each call taking a token of `budget`.
    pub fn new(concurrency: usize, budget: Option<BudgetSettings>) -> Self {
        let free = concurrency.max(1);
        let background_limit = (free / BACKGROUND_SHARE).max(1);
        let budget = budget.map(|settings| Budget::new(settings, Instant::now()));
        let state = Arc::new(Mutex::new(State { free, background_limit, budget, ..State::default() }));
        Self { state, demands: Arc::default() }
    }

    /// Waits for a turn to call STS for `key`, with `priority`, or with a request's priority
    /// if a request is waiting for `key`. The turn ends when the returned permit is dropped.
    pub async fn turn(&self, key: &CredentialKey, priority: Priority) -> Permit {
        let (id, turn) = {
            let mut state = self.state.lock();
            let priority = if state.demanded.contains_key(key) { Priority::Demand } else { priority };
            let background = priority != Priority::Demand;
            let queued = state.waiting.iter().any(|queue| !queue.is_empty());
            if state.free > 0
                && !queued
                && (!background || state.background < state.background_limit)
                && state.take_token(Instant::now(), background)
            {
                state.free -= 1;
                state.background += usize::from(background);
                return Permit { state: self.state.clone(), background };
            }
            let (sender, turn) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            state.waiting[priority as usize].push_back(Waiter { id, key: key.clone(), turn: sender });
            // Held back by the budget alone: someone must wake the queue at the next token.
            dispatch(&self.state, &mut state);
            (id, turn)
        };
        let mut waiting = Waiting { state: &self.state, id, turn };
        // The sender is only dropped after a successful send or by `Waiting::drop`.
        let background = (&mut waiting.turn).await.unwrap_or(false);
        waiting.id = 0;
        Permit { state: self.state.clone(), background }
    }

    /// A turn for a request's retry, now or not at all: a free turn, a token and a background
    /// call's place (see `budget`). A pod's first call goes at once; retrying it while
    /// STS throttles the account would multiply every throttled node's calls, and a retry
    /// waiting would hold the key's next request behind it: without a turn now, the request
    /// is answered with its error, and the pod's next request calls afresh.
    pub fn retry_now(&self) -> Option<Permit> {
        let mut state = self.state.lock();
        let now = Instant::now();
        if state.free > 0 && state.budget.as_mut().is_none_or(|budget| budget.take_retry(now)) {
            state.free -= 1;
            return Some(Permit { state: self.state.clone(), background: false });
        }
        None
    }

    /// Tokens left in the budget now (`iamlet_sts_budget_tokens`), if there is one.
    pub fn budget_tokens(&self) -> Option<f64> {
        self.state.lock().budget.as_mut().map(|budget| budget.tokens(Instant::now()))
    }

    /// The background's pace now (`iamlet_sts_background_pace`), if there is a budget.
    pub fn background_pace(&self) -> Option<f64> {
        self.state.lock().budget.as_ref().map(Budget::pace)
    }

    /// What STS made of a call: the background's pace grows when it accepted one, and
    /// halves when it throttled one.
    pub fn answered(&self, throttled: bool) {
        let mut state = self.state.lock();
        let now = Instant::now();
        if let Some(budget) = &mut state.budget {
            match throttled {
                true => budget.throttled(now),
                false => budget.accepted(now),
            }
        }
    }

    /// A request waits for `key`, and may have it tried again until `until`: until the
    /// returned guard is dropped, a call for `key` (waiting now or made later) has a
    /// request's priority, and a background call waiting out its backoff is woken.
    pub fn demand(&self, key: &CredentialKey, until: Instant) -> Demand {
        let demand = self.register_demand(key, until);
        self.demands.notify_waiters();
        demand
    }

    /// Resolves when a request next starts waiting for some key: a background call waiting
    /// out its backoff checks whether it is its own (see [`StsQueue::demanded_until`]).
    pub fn demand_arrived(&self) -> Notified<'_> {
        self.demands.notified()
    }

    /// Until when the requests waiting for `key` may have it tried again, if any waits.
    pub fn demanded_until(&self, key: &CredentialKey) -> Option<Instant> {
        self.state.lock().demanded.get(key).map(|(_, until)| *until)
    }

    fn register_demand(&self, key: &CredentialKey, until: Instant) -> Demand {
        let mut state = self.state.lock();
        let entry = state.demanded.entry(key.clone()).or_insert((0, until));
        entry.0 += 1;
        entry.1 = entry.1.max(until);
        let mut promoted = None;
        for queue in &mut state.waiting[Priority::Refresh as usize..] {
            if let Some(at) = queue.iter().position(|waiter| &waiter.key == key) {
                promoted = queue.remove(at);
                break;
            }
        }
        if let Some(waiter) = promoted {
            state.waiting[Priority::Demand as usize].push_back(waiter);
            // A free turn the background could not take is the request's.
            dispatch(&self.state, &mut state);
        }
        Demand { state: self.state.clone(), key: key.clone() }
    }

    /// Calls waiting, by priority.
    #[cfg(test)]
    pub fn waiting(&self) -> [usize; PRIORITIES] {
        let state = self.state.lock();
        std::array::from_fn(|priority| state.waiting[priority].len())
    }
}

/// A turn to call STS; the next waiter's when dropped.
#[derive(Debug)]
pub struct Permit {
    state: Arc<Mutex<State>>,
    background: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        release(&self.state, &mut self.state.lock(), self.background);
    }
}

/// A request's claim on a key (see [`StsQueue::demand`]).
#[derive(Debug)]
pub struct Demand {
    state: Arc<Mutex<State>>,
    key: CredentialKey,
}

impl Drop for Demand {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        if let Some((count, _)) = state.demanded.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                state.demanded.remove(&self.key);
            }
        }
    }
}

/// A waiter's place in the queue, given up if the waiting call is dropped (its request timed
/// out): a turn handed to it meanwhile is passed on.
struct Waiting<'a> {
    state: &'a Arc<Mutex<State>>,
    /// Zero once the turn was taken.
    id: u64,
    turn: oneshot::Receiver<bool>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        let mut state = self.state.lock();
        for queue in &mut state.waiting {
            if let Some(at) = queue.iter().position(|waiter| waiter.id == self.id) {
                queue.remove(at);
                return;
            }
        }
        // Not in the queue: the turn was sent to it under the lock. Pass it on.
        if let Ok(background) = self.turn.try_recv() {
            release(self.state, &mut state, background);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::credentials::fake::key;

    /// Starts a task that takes a turn for `session` with `priority` and records the order.
    fn queued(
        queue: &StsQueue,
        session: &'static str,
        priority: Priority,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<()> {
        let (queue, order) = (queue.clone(), order.clone());
        tokio::spawn(async move {
            let _permit = queue.turn(&key(session), priority).await;
            order.lock().push(session);
            tokio::time::sleep(Duration::from_millis(10)).await;
        })
    }

    async fn until_waiting(queue: &StsQueue, count: usize) {
        while queue.waiting().iter().sum::<usize>() < count {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_goes_before_refreshes_and_refreshes_before_prefetches_the_asked_first() {
        let queue = StsQueue::new(1, None);
        let order = Arc::default();
        let busy = queue.turn(&key("busy"), Priority::Prefetch).await;
        let mut tasks = vec![];
        for (session, priority) in [
            ("p1", Priority::Prefetch),
            ("p2", Priority::Prefetch),
            ("a1", Priority::PrefetchAsked),
            ("r1", Priority::Refresh),
            ("d1", Priority::Demand),
        ] {
            tasks.push(queued(&queue, session, priority, &order));
            until_waiting(&queue, tasks.len()).await;
        }
        drop(busy);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock(), ["d1", "r1", "a1", "p1", "p2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_for_a_waiting_prefetch_promotes_it() {
        let queue = StsQueue::new(1, None);
        let order = Arc::default();
        let busy = queue.turn(&key("busy"), Priority::Prefetch).await;
        let first = queued(&queue, "p1", Priority::Prefetch, &order);
        until_waiting(&queue, 1).await;
        let asked = queued(&queue, "p2", Priority::Prefetch, &order);
        until_waiting(&queue, 2).await;
        let demand = queue.demand(&key("p2"), tokio::time::Instant::now());
        assert_eq!(queue.waiting(), [1, 0, 0, 1]);
        // A call for a demanded key made later has a request's priority too.
        let later = queued(&queue, "p2", Priority::Prefetch, &order);
        until_waiting(&queue, 3).await;
        assert_eq!(queue.waiting(), [2, 0, 0, 1]);
        drop(busy);
        for task in [asked, later, first] {
            task.await.unwrap();
        }
        assert_eq!(*order.lock(), ["p2", "p2", "p1"]);
        drop(demand);
        assert!(queue.state.lock().demanded.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn every_call_takes_a_token_of_the_budget_and_a_request_gets_the_next_one() {
        let queue = StsQueue::new(8, Some(BudgetSettings { rate: 10.0, burst: 2.0 }));
        let start = tokio::time::Instant::now();
        let order = Arc::default();
        let burst = [queue.turn(&key("a"), Priority::Prefetch).await, queue.turn(&key("b"), Priority::Demand).await];
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst at once");
        assert!(queue.budget_tokens().unwrap() < 1.0);
        let prefetch = queued(&queue, "p", Priority::Prefetch, &order);
        until_waiting(&queue, 1).await;
        let request = queued(&queue, "d", Priority::Demand, &order);
        until_waiting(&queue, 2).await;
        // Free turns, but no token: the queue waits for the rate, the request first.
        for task in [request, prefetch] {
            task.await.unwrap();
        }
        assert_eq!(*order.lock(), ["d", "p"]);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(300), "{elapsed:?}");
        drop(burst);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_loses_no_turn() {
        let queue = StsQueue::new(1, None);
        let busy = queue.turn(&key("busy"), Priority::Demand).await;
        let a = key("a");
        let gives_up = tokio::time::timeout(Duration::from_millis(5), queue.turn(&a, Priority::Demand));
        assert!(gives_up.await.is_err());
        assert_eq!(queue.waiting(), [0, 0, 0, 0], "its place is given up");
        drop(busy);
        let _again = tokio::time::timeout(Duration::from_secs(1), queue.turn(&key("b"), Priority::Prefetch))
            .await
            .expect("the freed turn is there");
        assert_eq!(queue.state.lock().free, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_bounds_the_calls_and_the_background_a_quarter_of_them() {
        let queue = StsQueue::new(8, None);
        let keys: Vec<CredentialKey> = (0..10).map(|i| key(&format!("k{i}"))).collect();
        let first = queue.turn(&keys[0], Priority::Prefetch).await;
        let _second = queue.turn(&keys[1], Priority::Refresh).await;
        let third = tokio::time::timeout(Duration::from_millis(5), queue.turn(&keys[2], Priority::Prefetch));
        assert!(third.await.is_err(), "prefetches and refreshes take 2 of 8 turns at most");
        let mut requests = Vec::new();
        for key in &keys[3..9] {
            let turn = tokio::time::timeout(Duration::from_millis(5), queue.turn(key, Priority::Demand));
            requests.push(turn.await.expect("requests find the other 6 free"));
        }
        let ninth = tokio::time::timeout(Duration::from_millis(5), queue.turn(&keys[9], Priority::Demand));
        assert!(ninth.await.is_err(), "8 at once in all");
        drop(requests.pop());
        let _tenth = queue.turn(&keys[9], Priority::Demand).await;
        drop(first);
        let _again = queue.turn(&keys[2], Priority::Prefetch).await;
    }
}
