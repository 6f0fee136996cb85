//! Admin port and logging flags.

use clap::{Args, ValueEnum};

use super::FlagError;
use super::values::parse_log_level;
use crate::admin::AdminSettings;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admin port and logging")]
pub struct AdminArgs {
    /// Port of the admin endpoints (/healthz, /readyz, /metrics, /debug/store).
    #[arg(long, default_value_t = 8182)]
    pub metrics_port: u16,

    /// Serve /debug/store on the admin port.
    #[arg(long)]
    pub debug: bool,

    /// Log format: `text` or `json`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level: trace, debug, info, warn, error (kube2iam's fatal and panic mean error).
    #[arg(long, default_value = "info", value_parser = parse_log_level)]
    pub log_level: tracing::Level,

    /// Debug logging (same as `--log-level=debug`).
    #[arg(long)]
    pub verbose: bool,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the binary logs.
#[derive(Debug, Clone, Copy)]
pub struct Logging {
    pub log_format: LogFormat,
    /// `--log-level`, raised to debug by `--verbose`.
    pub log_level: tracing::Level,
}

impl AdminArgs {
    pub fn settings(self) -> Result<(AdminSettings, Logging), FlagError> {
        if self.metrics_port == 0 {
            return Err(FlagError { flag: "--metrics-port", message: "port 0 is not allowed".into() });
        }
        let log_level = if self.verbose { tracing::Level::DEBUG.max(self.log_level) } else { self.log_level };
        Ok((
            AdminSettings { metrics_port: Some(self.metrics_port), debug: self.debug },
            Logging { log_format: self.log_format, log_level },
        ))
    }
}
