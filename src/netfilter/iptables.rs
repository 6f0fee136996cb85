//! Running iptables: the backend (nft or legacy), the xtables lock, and clear errors.
//!
//! The binary is run with tokio's process support, so a slow iptables (a large ruleset, a
//! held lock) never blocks the runtime. `-w` waits for the xtables lock instead of failing
//! when kube-proxy or the CNI holds it.

use std::process::Stdio;

use super::rules::Family;

/// Which iptables backend to use (`--iptables-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The one kube-proxy uses on this node (the one holding more Kubernetes rules).
    Auto,
    Nft,
    Legacy,
}

/// Why an iptables command failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{program} not found: install the iptables package (the iamlet image has it)")]
    Missing { program: String },
    #[error("{program} was refused: iamlet needs the NET_ADMIN and NET_RAW capabilities ({stderr})")]
    Permission { program: String, stderr: String },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// One iptables program for one family (`iptables-nft`, `ip6tables-legacy`, `iptables`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iptables {
    pub program: String,
    pub family: Family,
}

impl Iptables {
    /// Runs `program -w -t <table> <args>`; returns stdout.
    pub async fn table(&self, table: &str, args: &[String]) -> Result<String, IptablesError> {
        let mut argv = vec!["-w".to_string(), "-t".into(), table.into()];
        argv.extend_from_slice(args);
        run(&self.program, &argv, None).await
    }

    /// Like [`Iptables::table`], but a failure is `Ok(false)` (for `-C` checks); a missing
    /// binary or permission is still an error.
    pub async fn succeeds(&self, table: &str, args: &[String]) -> Result<bool, IptablesError> {
        match self.table(table, args).await {
            Ok(_) => Ok(true),
            Err(IptablesError::Failed { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Applies `input` with `<program>-restore -w --noflush`: every table section is one
    /// atomic commit, and chains not named in it are left alone.
    pub async fn restore(&self, input: &str) -> Result<(), IptablesError> {
        let program = format!("{}-restore", self.program);
        let argv = ["-w".to_string(), "--noflush".into()];
        run(&program, &argv, Some(input)).await.map(drop)
    }
}

/// Runs `program args` (with `input` on stdin); returns stdout. A missing program, a refusal
/// for want of a capability and any other failure are told apart (nft shares this).
pub(crate) async fn run(program: &str, args: &[String], input: Option<&str>) -> Result<String, IptablesError> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => IptablesError::Missing { program: program.to_string() },
            _ => IptablesError::Failed { command: program.to_string(), stderr: e.to_string() },
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let written = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        written.map_err(|e| IptablesError::Failed { command: program.to_string(), stderr: e.to_string() })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| IptablesError::Failed { command: program.to_string(), stderr: e.to_string() })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    if stderr.contains("Permission denied")
        || stderr.contains("must be root")
        || stderr.contains("Operation not permitted")
    {
        return Err(IptablesError::Permission { program: program.to_string(), stderr });
    }
    let command = match input {
        Some(input) => format!("{program} {} <<{input}", args.join(" ")),
        None => format!("{program} {}", args.join(" ")),
    };
    Err(IptablesError::Failed { command, stderr })
}

/// The programs of a backend for a family, most specific first.
fn candidates(choice: BackendChoice, family: Family) -> Vec<String> {
    let tool = family.tool();
    match choice {
        BackendChoice::Nft => vec![format!("{tool}-nft")],
        BackendChoice::Legacy => vec![format!("{tool}-legacy")],
        BackendChoice::Auto => vec![format!("{tool}-nft"), format!("{tool}-legacy"), tool.to_string()],
    }
}

fn exists(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Counts the rules other components (kube-proxy, the CNI) have in a backend's nat table.
async fn foreign_rules(iptables: &Iptables) -> usize {
    iptables
        .table("nat", &["-S".to_string()])
        .await
        .map(|listing| listing.lines().filter(|l| l.starts_with("-A ")).count())
        .unwrap_or(0)
}

/// Picks the program for `family`. With `Auto`, the backend holding more rules wins (the one
/// kube-proxy and the CNI use: rules in the other would be invisible to them and vice versa);
/// with none anywhere, nft, Debian's and most distributions' default.
pub async fn select(choice: BackendChoice, family: Family) -> Result<Iptables, IptablesError> {
    let present: Vec<String> = candidates(choice, family).into_iter().filter(|p| exists(p)).collect();
    let Some(first) = present.first() else {
        return Err(IptablesError::Missing { program: candidates(choice, family).join(" or ") });
    };
    if choice != BackendChoice::Auto {
        return Ok(Iptables { program: first.clone(), family });
    }
    let nft = Iptables { program: format!("{}-nft", family.tool()), family };
    let legacy = Iptables { program: format!("{}-legacy", family.tool()), family };
    if !(present.contains(&nft.program) && present.contains(&legacy.program)) {
        return Ok(Iptables { program: first.clone(), family });
    }
    let (in_nft, in_legacy) = (foreign_rules(&nft).await, foreign_rules(&legacy).await);
    tracing::debug!(in_nft, in_legacy, "iptables backend rule counts");
    Ok(if in_legacy > in_nft { legacy } else { nft })
}

/// Every program present for `family`, for `iamlet cleanup` (which cannot know which backend
/// a crashed agent used).
pub fn all_present(family: Family) -> Vec<Iptables> {
    let tool = family.tool();
    let variants = [format!("{tool}-nft"), format!("{tool}-legacy")];
    let mut programs: Vec<String> = variants.into_iter().filter(|p| exists(p)).collect();
    if programs.is_empty() && exists(tool) {
        programs.push(tool.to_string());
    }
    programs.into_iter().map(|program| Iptables { program, family }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_binary_says_which_package_to_install() {
        let missing = Iptables { program: "iptables-not-installed".into(), family: Family::V4 };
        let error = missing.table("nat", &["-S".to_string()]).await.unwrap_err();
        assert!(matches!(error, IptablesError::Missing { .. }));
        assert!(error.to_string().contains("install the iptables package"), "{error}");
        assert!(missing.succeeds("nat", &["-S".to_string()]).await.is_err(), "a missing binary is not a failed check");
        let error = missing.restore("*nat\nCOMMIT\n").await.unwrap_err();
        assert!(error.to_string().contains("iptables-not-installed-restore not found"), "{error}");
    }

    #[test]
    fn forced_backends_name_their_programs() {
        assert_eq!(candidates(BackendChoice::Nft, Family::V6), ["ip6tables-nft"]);
        assert_eq!(candidates(BackendChoice::Legacy, Family::V4), ["iptables-legacy"]);
        assert_eq!(candidates(BackendChoice::Auto, Family::V4), ["iptables-nft", "iptables-legacy", "iptables"]);
    }
}
