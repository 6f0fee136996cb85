//! The Kubernetes client, from `--kubeconfig`, `--api-server`, `--api-token`, `--insecure`,
//! or the in-cluster service account.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub api_token: Option<String>,
    pub insecure: bool,
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--api-server {url:?} is not a URL")]
    ApiServer {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("no in-cluster configuration (outside a cluster, pass --kubeconfig or --api-server)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("the client could not be built")]
    Client(#[source] kube::Error),
}

/// Builds the client the watches use.
pub async fn client(config: &KubeSettings) -> Result<kube::Client, ClientError> {
    let api_server = |url: &String| url.parse().map_err(|source| ClientError::ApiServer { url: url.clone(), source });
    let mut kube_config = match (&config.kubeconfig, &config.api_server) {
        (Some(path), _) => {
            let kubeconfig = |source| ClientError::Kubeconfig { path: path.clone(), source };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.map_err(kubeconfig)?
        }
        (None, Some(url)) => kube::Config::new(api_server(url)?),
        (None, None) => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    if let Some(url) = &config.api_server {
        kube_config.cluster_url = api_server(url)?;
    }
    if let Some(token) = &config.api_token {
        kube_config.auth_info.token = Some(token.clone().into());
    }
    if config.insecure {
        kube_config.accept_invalid_certs = true;
    }
    kube::Client::try_from(kube_config).map_err(ClientError::Client)
}
