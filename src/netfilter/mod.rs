//! The DNAT rules that send pod metadata traffic to iamlet: install, check, repair, remove.
//!
//! kube2iam inserted one rule into PREROUTING and never removed it; every rollout guide ends
//! with "run iptables -t nat -D ... on every node". iamlet keeps its rules in its own chain
//! behind one tagged jump, so installing twice leaves one set, a check finds drift, and
//! removal (on exit, or `iamlet cleanup` after a crash) takes exactly what iamlet added.

pub mod interfaces;
pub mod iptables;
pub mod rules;

use std::net::SocketAddr;

pub use interfaces::{InterfacePattern, detect_cni, node_links};
pub use iptables::{BackendChoice, Iptables, IptablesError};
pub use rules::{CHAIN, Family};

/// The rules of one IP family: where metadata traffic comes from and where it goes.
#[derive(Debug, Clone)]
pub struct FamilyRules {
    pub iptables: Iptables,
    pub interface: InterfacePattern,
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

impl FamilyRules {
    fn jump(&self) -> Vec<String> {
        rules::jump_rule(self.iptables.family, &self.interface)
    }

    fn dnat(&self) -> Vec<String> {
        rules::dnat_rule(self.target)
    }

    /// Installs the chain, its DNAT rule and the jump (first in PREROUTING, ahead of the
    /// CNI's and kube-proxy's rules), replacing whatever iamlet had there before.
    pub async fn install(&self) -> Result<(), IptablesError> {
        let ipt = &self.iptables;
        if !ipt.nat_succeeds(&args(&["-S", CHAIN])).await? {
            ipt.nat(&args(&["-N", CHAIN])).await?;
        }
        ipt.nat(&args(&["-F", CHAIN])).await?;
        ipt.nat(&[args(&["-A", CHAIN]), self.dnat()].concat()).await?;
        self.remove_jumps().await?;
        ipt.nat(&[args(&["-I", "PREROUTING", "1"]), self.jump()].concat()).await?;
        Ok(())
    }

    /// Whether exactly iamlet's rules are in place. Position is not checked after install:
    /// others (kube-proxy) may prepend their own jumps, which do not match metadata traffic.
    pub async fn check(&self) -> Result<State, IptablesError> {
        let ipt = &self.iptables;
        let prerouting = ipt.nat(&args(&["-S", "PREROUTING"])).await?;
        if rules::jumps_in_listing(&prerouting).len() != 1
            || !ipt.nat_succeeds(&[args(&["-C", "PREROUTING"]), self.jump()].concat()).await?
        {
            return Ok(State::Drifted);
        }
        let Ok(chain) = ipt.nat(&args(&["-S", CHAIN])).await else { return Ok(State::Drifted) };
        if rules::rules_of_chain(&chain, CHAIN) != 1
            || !ipt.nat_succeeds(&[args(&["-C", CHAIN]), self.dnat()].concat()).await?
        {
            return Ok(State::Drifted);
        }
        Ok(State::InPlace)
    }

    /// Removes the jump(s) and the chain. Returns whether anything was there.
    pub async fn remove(&self) -> Result<bool, IptablesError> {
        remove_all(&self.iptables).await
    }

    async fn remove_jumps(&self) -> Result<usize, IptablesError> {
        remove_jumps(&self.iptables).await
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn remove_jumps(ipt: &Iptables) -> Result<usize, IptablesError> {
    let listing = ipt.nat(&args(&["-S", "PREROUTING"])).await?;
    let jumps = rules::jumps_in_listing(&listing);
    for jump in &jumps {
        ipt.nat(&[args(&["-D", "PREROUTING"]), jump.clone()].concat()).await?;
    }
    Ok(jumps.len())
}

/// Removes every jump to iamlet's chain and the chain itself from one program's nat table.
/// Returns whether anything was removed.
pub async fn remove_all(ipt: &Iptables) -> Result<bool, IptablesError> {
    let jumps = remove_jumps(ipt).await?;
    let chain = ipt.nat_succeeds(&args(&["-S", CHAIN])).await?;
    if chain {
        ipt.nat(&args(&["-F", CHAIN])).await?;
        ipt.nat(&args(&["-X", CHAIN])).await?;
    }
    Ok(jumps > 0 || chain)
}

/// iamlet's rules on every family it intercepts.
#[derive(Debug, Clone)]
pub struct Netfilter {
    pub families: Vec<FamilyRules>,
}

impl Netfilter {
    pub async fn install(&self) -> Result<(), IptablesError> {
        for family in &self.families {
            family.install().await?;
            tracing::info!(
                program = %family.iptables.program, interface = %family.interface, target = %family.target,
                "metadata traffic redirected to iamlet"
            );
        }
        Ok(())
    }

    /// Checks every family and reinstalls those that drifted. Returns how many were repaired.
    pub async fn reconcile(&self) -> Result<usize, IptablesError> {
        let mut repaired = 0;
        for family in &self.families {
            if family.check().await? == State::Drifted {
                tracing::warn!(program = %family.iptables.program, "iamlet's rules were changed or removed; repairing");
                family.install().await?;
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    pub async fn remove(&self) -> Result<(), IptablesError> {
        for family in &self.families {
            if family.remove().await? {
                tracing::info!(program = %family.iptables.program, "removed iamlet's rules");
            }
        }
        Ok(())
    }
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
    Ok(report)
}
