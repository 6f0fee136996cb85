//! iamlet's rules on the node: the DNAT that sends pod metadata traffic to iamlet, and the
//! backstop that refuses what is not redirected. Install, check, repair, remove.
//!
//! kube2iam inserted one rule into PREROUTING and never removed it; every rollout guide ends
//! with "run iptables -t nat -D ... on every node". iamlet keeps its rules in its own chains
//! behind tagged jumps (see [`rules`]), so installing twice leaves one set, a check finds
//! drift, and removal (on uninstall, or `iamlet cleanup` after a crash) takes exactly what
//! iamlet added. [`RuleKeeper`] owns the rules while the agent runs; [`lifecycle`] decides
//! whether they outlive it.

pub mod agent;
pub mod binding;
pub mod choice;
pub mod cni;
pub mod conntrack;
pub mod coverage;
pub mod interfaces;
pub mod iptables;
pub mod lifecycle;
pub mod rules;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use choice::{Choice, InterfaceSetting};
pub use interfaces::{InterfaceError, InterfaceMatch, InterfacePattern, node_links};
pub use iptables::{BackendChoice, Iptables, IptablesError};
pub use rules::{CHAIN, Family, Table};

use crate::metrics::Metrics;
use rules::Present;

/// How often `auto` looks again for the CNI while there is none.
const CNI_POLL: Duration = Duration::from_secs(2);

/// How iamlet protects the node: its rules, where they send traffic, and the taint lifted once
/// they are in place. From the node networking flags.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// The agent's IPv4 (or only) address: where the DNAT sends pod traffic.
    pub host_ip: Option<std::net::IpAddr>,
    pub host_ipv6: Option<std::net::Ipv6Addr>,
    pub host_interface: InterfaceSetting,
    pub cni_conf_dir: PathBuf,
    /// Whether iamlet installs its rules at all.
    pub iptables: bool,
    pub iptables_sync_period: Duration,
    pub iptables_keep_on_exit: lifecycle::KeepOnExit,
    pub iptables_backend: BackendChoice,
    /// The taint removed from the node once the rules are in place; `None` when disabled.
    pub startup_taint: Option<String>,
    /// `--bind-pod-ports` and where the CNI's records are.
    pub binding: binding::BindingSettings,
}

/// iamlet's rules in one IP family: which iptables program, and where traffic goes.
#[derive(Debug, Clone)]
pub struct FamilyRules {
    pub iptables: Iptables,
    /// The agent's address on this family.
    pub target: SocketAddr,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Exactly iamlet's rules, once.
    InPlace,
    /// Missing, duplicated or altered: needs installing again.
    Drifted,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn present(iptables: &Iptables, table: Table) -> Result<Present, IptablesError> {
    Ok(Present::from_listing(table, &iptables.table(table.name(), &args(&["-S"])).await?))
}

impl FamilyRules {
    fn family(&self) -> Family {
        self.iptables.family
    }

    /// Installs the backstop and the redirect for `interfaces`, replacing whatever iamlet had
    /// there before, in one `iptables-restore` run (the filter table first).
    pub async fn install(&self, interfaces: &InterfaceMatch) -> Result<(), IptablesError> {
        let jumps = rules::jump_rules(self.family(), interfaces);
        let mut input = String::new();
        for table in Table::INSTALL_ORDER {
            let present = present(&self.iptables, table).await?;
            input.push_str(&rules::install_section(table, &present, &jumps, &rules::chain_rule(table, self.target)));
        }
        self.iptables.restore(&input).await
    }

    /// Whether exactly iamlet's rules are in place. Position is not checked after install:
    /// others (kube-proxy, the CNI) may prepend their own jumps.
    pub async fn check(&self, interfaces: &InterfaceMatch) -> Result<State, IptablesError> {
        let jumps = rules::jump_rules(self.family(), interfaces);
        for table in Table::INSTALL_ORDER {
            let present = present(&self.iptables, table).await?;
            if present.jumps.len() != jumps.len() || present.chain_rules != 1 {
                return Ok(State::Drifted);
            }
            let base = table.base_chain();
            for jump in &jumps {
                if !self.iptables.succeeds(table.name(), &[args(&["-C", base]), jump.clone()].concat()).await? {
                    return Ok(State::Drifted);
                }
            }
            let rule = rules::chain_rule(table, self.target);
            if !self.iptables.succeeds(table.name(), &[args(&["-C", CHAIN]), rule].concat()).await? {
                return Ok(State::Drifted);
            }
        }
        Ok(State::InPlace)
    }
}

/// Removes every jump to iamlet's chains and the chains themselves from one program's
/// tables, the redirect first, in one `iptables-restore` run. Returns whether anything was there.
pub async fn remove_all(iptables: &Iptables) -> Result<bool, IptablesError> {
    let mut input = String::new();
    let mut found = false;
    for table in Table::INSTALL_ORDER.iter().rev() {
        let present = present(iptables, *table).await?;
        found |= !present.is_empty();
        input.push_str(&rules::remove_section(*table, &present));
    }
    if found {
        iptables.restore(&input).await?;
    }
    Ok(found)
}

/// iamlet's rules on every family it intercepts.
#[derive(Debug, Clone)]
pub struct NodeRules {
    pub families: Vec<FamilyRules>,
}

impl NodeRules {
    /// Picks the iptables program of each family and checks it can be used, so a missing
    /// binary or capability stops the agent at once with the fix in the message.
    pub async fn prepare(targets: &[SocketAddr], backend: BackendChoice) -> Result<Self, IptablesError> {
        let mut families = Vec::new();
        for target in targets {
            let iptables = iptables::select(backend, Family::of(&target.ip())).await?;
            present(&iptables, Table::Nat).await?;
            families.push(FamilyRules { iptables, target: *target });
        }
        Ok(Self { families })
    }

    pub async fn install(&self, interfaces: &InterfaceMatch) -> Result<(), IptablesError> {
        for family in &self.families {
            family.install(interfaces).await?;
            tracing::info!(
                program = %family.iptables.program, interface = %interfaces, target = %family.target,
                "metadata traffic redirected to iamlet; the rest refused"
            );
        }
        Ok(())
    }

    /// Checks every family and reinstalls those that drifted. Returns how many were repaired.
    pub async fn reconcile(&self, interfaces: &InterfaceMatch) -> Result<usize, IptablesError> {
        let mut repaired = 0;
        for family in &self.families {
            if family.check(interfaces).await? == State::Drifted {
                tracing::warn!(program = %family.iptables.program, "iamlet's rules were changed or removed; repairing");
                family.install(interfaces).await?;
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    pub async fn remove(&self) -> Result<(), IptablesError> {
        for family in &self.families {
            if remove_all(&family.iptables).await? {
                tracing::info!(program = %family.iptables.program, "removed iamlet's rules");
            }
        }
        Ok(())
    }

    /// Deletes connections to the metadata address that bypass iamlet (made before its rules).
    async fn forget_unredirected(&self, warned: &mut bool) {
        for family in &self.families {
            match conntrack::forget_unredirected(family.family()).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(
                    count,
                    family = family.family().label(),
                    "reset connections to the metadata address made before iamlet's rules"
                ),
                Err(error) if !*warned => {
                    *warned = true;
                    tracing::warn!(%error, "cannot reset connections made before iamlet's rules; \
                        the backstop still refuses them");
                }
                Err(_) => {}
            }
        }
    }
}

/// Where the rules stand, for `/readyz`, the startup taint and the coverage check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesState {
    /// Not installed yet: what iamlet is waiting for (the CNI under `auto`, or a link that
    /// `--host-interface` names).
    Waiting(String),
    /// Installed for these interfaces and, at the last check, intact.
    InPlace(InterfaceMatch),
    /// Installed for these interfaces, but the last check or repair failed.
    Failing(InterfaceMatch),
}

impl RulesState {
    /// Installed and, at the last check, intact: the node is protected.
    pub fn is_in_place(&self) -> bool {
        matches!(self, RulesState::InPlace(_))
    }

    pub fn interfaces(&self) -> Option<&InterfaceMatch> {
        match self {
            RulesState::Waiting(_) => None,
            RulesState::InPlace(interfaces) | RulesState::Failing(interfaces) => Some(interfaces),
        }
    }
}

/// Owns the rules while the agent runs: resolves the interfaces (waiting for the CNI under
/// `auto`), installs, resets connections that bypass iamlet, then checks and repairs every
/// sync period.
pub struct RuleKeeper {
    pub rules: NodeRules,
    pub setting: InterfaceSetting,
    pub cni_conf_dir: PathBuf,
    pub sync_period: Duration,
    pub metrics: Arc<Metrics>,
    pub state: watch::Sender<RulesState>,
    /// The pod port binding, decided once the interfaces are known.
    pub binding: binding::BindingPlan,
}

impl RuleKeeper {
    pub async fn run(self) {
        let interfaces = self.interfaces().await;
        let nft = binding::Nft::default();
        let binder = self.binding.decide(&interfaces, &nft).await.map(Arc::new);
        // The binding's own task: dropped (and aborted) with this one.
        let mut follower = tokio::task::JoinSet::new();
        match &binder {
            Some(binder) => drop(follower.spawn(binder.clone().follow())),
            // A predecessor's binding would refuse pods this agent no longer binds.
            None => match binding::remove(&nft).await {
                Ok(true) => tracing::info!("removed a previous agent's pod port binding"),
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "no pod port binding to remove"),
            },
        }
        let mut conntrack_warned = false;
        let mut ticks = tokio::time::interval(self.sync_period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut installed = false;
        // Under `auto`, whether the binding stays on is settled once the pod cache has
        // synced: the rules are reported in place only then, but checked and repaired meanwhile.
        let mut unsettled = binder.is_some();
        loop {
            // Woken by the settling itself (at most once: it is checked before each wait).
            let settling = unsettled && binder.as_ref().is_some_and(|binder| !binder.is_settled());
            tokio::select! {
                _ = ticks.tick() => {}
                _ = async { binder.as_ref().expect("settling only with a binder").settled().await }, if settling => {}
            }
            if !*self.binding.holds.borrow() {
                // A successor is taking over, or has: it keeps the rules, as they are.
                continue;
            }
            // The binding first: no request is redirected to iamlet before pods are bound.
            if let Some(binder) = &binder {
                let bound = match installed {
                    false => binder.install().await.map(|()| false),
                    true => binder.reconcile().await,
                };
                match bound {
                    Ok(repaired) => {
                        self.metrics.iptables_repairs.inc_by(u64::from(repaired));
                    }
                    Err(error) => {
                        self.metrics.iptables_errors.inc();
                        tracing::error!(%error, "cannot install or check the pod port binding");
                        self.state.send_if_modified(|state| replace(state, RulesState::Failing(interfaces.clone())));
                        continue;
                    }
                }
            }
            let outcome = match installed {
                false => self.rules.install(&interfaces).await.map(|()| 1),
                true => self.rules.reconcile(&interfaces).await.inspect(|repaired| {
                    self.metrics.iptables_repairs.inc_by(*repaired as u64);
                }),
            };
            match outcome {
                Ok(changed) => {
                    installed = true;
                    if changed > 0 {
                        self.rules.forget_unredirected(&mut conntrack_warned).await;
                    }
                    unsettled = binder.as_ref().is_some_and(|binder| !binder.is_settled());
                    if !unsettled {
                        self.state.send_if_modified(|state| replace(state, RulesState::InPlace(interfaces.clone())));
                    }
                }
                Err(error) => {
                    self.metrics.iptables_errors.inc();
                    tracing::error!(%error, "cannot install or check iamlet's rules");
                    self.state.send_if_modified(|state| replace(state, RulesState::Failing(interfaces.clone())));
                }
            }
        }
    }

    /// The interfaces to intercept ([`choice::look`]), looking again every 2 s until there
    /// is an answer: meanwhile not ready, with what is awaited said once.
    async fn interfaces(&self) -> InterfaceMatch {
        let mut waited = false;
        loop {
            match choice::look(&self.setting, &self.cni_conf_dir, &node_links()) {
                Choice::Found { interfaces, detected: Some((cni, from)) } => {
                    tracing::info!(cni, from, interface = %interfaces, "detected the pod network's interfaces");
                    return interfaces;
                }
                Choice::Found { interfaces, detected: None } => {
                    if waited {
                        tracing::info!(interface = %interfaces, "the interfaces --host-interface names are here");
                    }
                    return interfaces;
                }
                Choice::Waiting { why, detail } => {
                    if self.state.send_if_modified(|current| replace(current, RulesState::Waiting(why))) && !waited {
                        tracing::warn!("{detail}");
                    }
                    waited = true;
                    tokio::time::sleep(CNI_POLL).await;
                }
            }
        }
    }
}

/// Replaces `current` with `new`; whether that changed it (for `send_if_modified`).
fn replace(current: &mut RulesState, new: RulesState) -> bool {
    let changed = *current != new;
    *current = new;
    changed
}

/// `iamlet cleanup`: removes iamlet's rules from every backend and family present. Returns
/// one line per program saying what it did.
pub async fn cleanup() -> Result<Vec<String>, IptablesError> {
    let mut report = Vec::new();
    for family in [Family::V4, Family::V6] {
        for ipt in iptables::all_present(family) {
            let line = match remove_all(&ipt).await {
                Ok(true) => format!("{} ({}): removed iamlet's rules", ipt.program, family.label()),
                Ok(false) => format!("{} ({}): nothing to remove", ipt.program, family.label()),
                // A family the kernel lacks (no IPv6, no legacy tables) has nothing of ours.
                Err(IptablesError::Failed { stderr, .. }) => {
                    format!("{} ({}): skipped ({stderr})", ipt.program, family.label())
                }
                Err(other) => return Err(other),
            };
            report.push(line);
        }
    }
    if report.is_empty() {
        return Err(IptablesError::Missing { program: "iptables".into() });
    }
    report.push(match binding::remove(&binding::Nft::default()).await {
        Ok(true) => "nft (bridge, netdev, inet): removed iamlet's pod port binding".into(),
        Ok(false) => "nft (bridge, netdev, inet): no pod port binding to remove".into(),
        Err(error) => format!("nft (bridge, netdev, inet): skipped ({error})"),
    });
    Ok(report)
}
