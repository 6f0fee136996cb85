//! The fleet simulation: many nodes running iamlet's own credential code on simulated time,
//! against one account's STS. See `iamlet_testkit::fleet` for what is modelled.
//!
//! ```text
//! cargo run --release --example fleet -- --nodes 5000 --pods-per-node 110 --roles 200 \
//!     --sts-rps 600 --hours 4 --scope pod
//! ```
//!
//! Prints a line per phase, then, as its last line, one JSON object: `nodes`, `scope`,
//! `assume_role_per_s` (`median`, `p99`, `max`), `throttled`, `pod_visible_failures`,
//! `late_credentials` and more.

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use iamlet::credentials::BudgetSettings;
use iamlet::resolve::SessionScope;
use iamlet_testkit::fleet::{FleetConfig, simulate};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scope {
    Pod,
    ServiceAccount,
    Role,
}

/// Simulates a fleet of iamlet agents against one account's STS.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    #[arg(long, default_value_t = 110)]
    pods_per_node: usize,
    /// Roles in the cluster.
    #[arg(long, default_value_t = 200)]
    roles: usize,
    /// Roles each node pool runs.
    #[arg(long, default_value_t = 8)]
    roles_per_pool: usize,
    /// Roles of DaemonSets (a pod of each on every node).
    #[arg(long, default_value_t = 2)]
    daemonset_roles: usize,
    #[arg(long, default_value_t = 1)]
    service_accounts_per_role: usize,
    /// The account's AssumeRole limit (calls per second; also the bucket's burst). By default
    /// 600 for 5,000 nodes, in proportion to --nodes: a small fleet faces the same contention.
    #[arg(long)]
    sts_rps: Option<f64>,
    /// Every node's --sts-max-rps and --sts-burst.
    #[arg(long, default_value_t = 10.0)]
    node_max_rps: f64,
    #[arg(long, default_value_t = 20)]
    node_burst: u32,
    /// Simulated hours: the rollout, the crash and the bursts keep their share of the time.
    #[arg(long, default_value_t = 4.0)]
    hours: f64,
    /// Share of a node's pods replaced per hour.
    #[arg(long, default_value_t = 0.1)]
    churn_per_hour: f64,
    #[arg(long, value_enum, default_value_t = Scope::Pod)]
    scope: Scope,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    let scope = match args.scope {
        Scope::Pod => SessionScope::Pod,
        Scope::ServiceAccount => SessionScope::ServiceAccount,
        Scope::Role => SessionScope::Role,
    };
    let mut config = FleetConfig::scaled(scope, args.nodes, Duration::from_secs_f64(args.hours * 3600.0));
    config.pods_per_node = args.pods_per_node;
    config.roles = args.roles;
    config.roles_per_pool = args.roles_per_pool;
    config.daemonset_roles = args.daemonset_roles;
    config.service_accounts_per_role = args.service_accounts_per_role;
    if let Some(rps) = args.sts_rps {
        config.sts_rps = rps;
        config.sts_burst = rps;
    }
    config.node_budget = BudgetSettings { rate: args.node_max_rps, burst: args.node_burst.into() };
    config.churn_per_hour = args.churn_per_hour;
    config.seed = args.seed;
    config.progress = true;
    eprintln!("{config:?}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let wall = Instant::now();
    let report = runtime.block_on(simulate(config));
    for phase in &report.phases {
        let spread = phase.assume_role_per_s;
        eprintln!(
            "{:>8}: AssumeRole/s median {} p99 {} max {}; throttled {}; pod-visible failures {}",
            phase.name, spread.median, spread.p99, spread.max, phase.throttled, phase.pod_visible_failures
        );
    }
    eprintln!("simulated in {:.1} s", wall.elapsed().as_secs_f64());
    let mut json = report.json();
    json["wall_seconds"] = serde_json::json!((wall.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    println!("{json}");
}
