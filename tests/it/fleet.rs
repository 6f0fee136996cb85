//! The fleet simulation at a small size (50 nodes, one simulated hour, STS's limit in
//! proportion: 6 calls/s), every scope: iamlet's own credential code on paused time, with a
//! rollout (hand-over), a crash of every agent and job bursts. The full size is the
//! benchmark (`cargo run --release --example fleet`, README "STS at fleet scale").

use std::time::Duration;

use iamlet::resolve::SessionScope;
use iamlet_testkit::fleet::{FleetConfig, FleetReport, Phase, simulate};

async fn run(scope: SessionScope) -> FleetReport {
    let mut config = FleetConfig::scaled(scope, 50, Duration::from_secs(3600));
    // STS's bucket holds ten seconds of the small fleet's share: 50 nodes' calls in a second
    // vary ten times more, against their share, than 5,000 nodes' do (√100), and the full
    // size's one second of 600 calls absorbs what ten seconds of 6 absorb here.
    config.sts_burst = config.sts_rps * 10.0;
    let report = simulate(config).await;
    eprintln!("{}", report.json());
    report
}

fn phase<'a>(report: &'a FleetReport, name: &str) -> &'a Phase {
    report.phases.iter().find(|phase| phase.name == name).expect("the phase ran")
}

/// What every scope must show: pods never see the steady state, the rollout or the job
/// bursts; no credentials are served late; the account's limit holds outside the crash.
fn assert_pods_never_notice(report: &FleetReport) {
    let scope = report.scope;
    for name in ["steady", "rollout"] {
        let phase = phase(report, name);
        assert_eq!(phase.pod_visible_failures, 0, "{scope}: {name}: {phase:?}");
        assert!(phase.assume_role_per_s.median <= 6.0, "{scope}: {name}: within the account's 6/s: {phase:?}");
    }
    // Agents started together (the simulation's start) refresh at their own seconds: the
    // steady state never finds the limit.
    let steady = phase(report, "steady");
    assert_eq!(steady.throttled, 0, "{scope}: the steady state throttled: {steady:?}");
    assert_eq!(report.late_credentials, 0, "{scope}: credentials served within their last 15 minutes");
    assert!(report.requests > report.pods as u64, "{scope}: every pod asked: {}", report.requests);
}

#[tokio::test(start_paused = true)]
async fn fleet_in_pod_scope() {
    let report = run(SessionScope::Pod).await;
    assert_pods_never_notice(&report);
    // The hand-over: a rollout of every agent costs no more calls than the steady state.
    let (steady, rollout) = (phase(&report, "steady"), phase(&report, "rollout"));
    assert!(rollout.assume_role_per_s.median <= steady.assume_role_per_s.p99, "{rollout:?} vs {steady:?}");
}

#[tokio::test(start_paused = true)]
async fn fleet_in_service_account_scope_makes_a_tenth_of_the_calls() {
    let (pods, accounts) = (run(SessionScope::Pod).await, run(SessionScope::ServiceAccount).await);
    assert_pods_never_notice(&accounts);
    let (by_pod, by_account) = (phase(&pods, "steady").calls, phase(&accounts, "steady").calls);
    assert!(by_account * 10 <= by_pod, "{by_account} calls in service-account scope, {by_pod} in pod scope");
    let bursts = phase(&accounts, "bursts");
    assert_eq!((bursts.pod_visible_failures, bursts.throttled), (0, 0), "{bursts:?}");
}

#[tokio::test(start_paused = true)]
async fn fleet_in_role_scope() {
    let report = run(SessionScope::Role).await;
    assert_pods_never_notice(&report);
    let bursts = phase(&report, "bursts");
    assert_eq!((bursts.pod_visible_failures, bursts.throttled), (0, 0), "{bursts:?}");
}
