//! Running `nft`: one transaction per call (`nft -f -`), listings as JSON (`nft -j`).
//!
//! nftables' own command-line interface is its stable one (libnftables behind it); the binding
//! needs the bridge family and sets, which iptables cannot express.

use super::listing::{self, Listing};
use super::ruleset::TABLE;
use crate::netfilter::iptables::{self, IptablesError};

/// Why an nft command failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft not found: install the nftables package (the iamlet image has it)")]
    Missing,
    #[error("nft was refused: iamlet needs the NET_ADMIN capability ({0})")]
    Permission(String),
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("nft listed something unreadable: {0}")]
    Listing(String),
}

impl From<IptablesError> for NftError {
    fn from(error: IptablesError) -> Self {
        match error {
            IptablesError::Missing { .. } => NftError::Missing,
            IptablesError::Permission { stderr, .. } => NftError::Permission(stderr),
            IptablesError::Failed { command, stderr } => NftError::Failed { command, stderr },
        }
    }
}

/// The `nft` program.
#[derive(Debug, Clone)]
pub struct Nft {
    pub program: String,
}

impl Default for Nft {
    fn default() -> Self {
        Self { program: "nft".into() }
    }
}

impl Nft {
    /// Applies `ruleset` as one transaction: all of it, or none.
    pub async fn apply(&self, ruleset: &str) -> Result<(), NftError> {
        iptables::run(&self.program, &["-f".into(), "-".into()], Some(ruleset)).await?;
        Ok(())
    }

    /// iamlet's table in `family` as installed; `None` when there is none.
    pub async fn list(&self, family: &str) -> Result<Option<Listing>, NftError> {
        let args = ["-j", "list", "table", family, TABLE].map(String::from);
        match iptables::run(&self.program, &args, None).await {
            Ok(json) => listing::parse(&json).map(Some).map_err(NftError::Listing),
            Err(IptablesError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
            Err(other) => Err(other.into()),
        }
    }

    /// Whether nft runs here at all (the program exists and the kernel has nf_tables).
    pub async fn usable(&self) -> Result<(), NftError> {
        iptables::run(&self.program, &["list".into(), "tables".into()], None).await.map(drop).map_err(Into::into)
    }
}
