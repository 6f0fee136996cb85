//! Kubernetes client flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::FlagError;
use super::values::parse_duration;
use crate::cluster::client::KubeSettings;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubeArgs {
    /// Path to a kubeconfig; in-cluster configuration when unset.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API server URL (overrides the kubeconfig's).
    #[arg(long)]
    pub api_server: Option<String>,

    /// Bearer token for the API server.
    #[arg(long, env = "IAMLET_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Skip TLS verification of the API server (testing only).
    #[arg(long)]
    pub insecure: bool,

    /// How long the pod watch may fail before `/readyz` says not ready (pods already known
    /// keep being served; new pods and changes are not seen meanwhile).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pod_watch_stale_after: Duration,

    /// Accepted for kube2iam compatibility; no effect: watches resume from their last
    /// resourceVersion and re-list on 410 Gone, so no periodic resync is needed.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub cache_resync_period: Option<Duration>,
}

impl KubeArgs {
    /// The client's settings, and `--pod-watch-stale-after`.
    pub fn settings(self) -> Result<(KubeSettings, Duration), FlagError> {
        if let Some(url) = &self.api_server {
            url.parse::<http::Uri>().ok().filter(|uri| uri.scheme().is_some() && uri.host().is_some()).ok_or_else(
                || FlagError {
                    flag: "--api-server",
                    message: format!("{url:?} is not a URL like https://10.0.0.1:6443"),
                },
            )?;
        }
        let settings = KubeSettings {
            kubeconfig: self.kubeconfig,
            api_server: self.api_server,
            api_token: self.api_token,
            insecure: self.insecure,
        };
        Ok((settings, self.pod_watch_stale_after))
    }
}
