//! The Kubernetes client, from `--kubeconfig`, `--api-server`, `--api-token`, `--insecure`,
//! or the in-cluster service account.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::StartupError;

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub api_token: Option<String>,
    pub insecure: bool,
}

/// Builds the client the watches use.
pub async fn client(config: &KubeSettings) -> Result<kube::Client, StartupError> {
    let error = |e: &dyn std::fmt::Display| StartupError::Kube(e.to_string());
    let mut kube_config = match (&config.kubeconfig, &config.api_server) {
        (Some(path), _) => {
            let file =
                Kubeconfig::read_from(path).map_err(|e| error(&format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.map_err(|e| error(&e))?
        }
        (None, Some(url)) => kube::Config::new(url.parse().map_err(|e| error(&format!("--api-server: {e}")))?),
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| error(&format!("{e} (outside a cluster, pass --kubeconfig or --api-server)")))?,
    };
    if let Some(url) = &config.api_server {
        kube_config.cluster_url = url.parse().map_err(|e| error(&format!("--api-server: {e}")))?;
    }
    if let Some(token) = &config.api_token {
        kube_config.auth_info.token = Some(token.clone().into());
    }
    if config.insecure {
        kube_config.accept_invalid_certs = true;
    }
    kube::Client::try_from(kube_config).map_err(|e| error(&e))
}
