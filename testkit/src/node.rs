//! A "node": the fake API server, STS (moto behind the recording proxy), the fake node IMDS,
//! and the iamlet agent itself, started in-process against them.

use std::net::SocketAddr;

use aws_config::BehaviorVersion;
use aws_sdk_sts::config::{Credentials, Region};
use iamlet::app::{Dependencies, RunningAgent};
use iamlet::cli::Cli;
use iamlet::credentials::{AwsSts, StsClientSettings};

use crate::apiserver::FakeApiServer;
use crate::eventually;
use crate::flags::AgentFlags;
use crate::imds::FakeImds;
use crate::pod_client::{self, Reply};
use crate::sts_proxy::StsProxy;

pub struct TestNode {
    pub api: FakeApiServer,
    pub sts: StsProxy,
    pub imds: FakeImds,
    pub agent: RunningAgent,
    /// The node's state directory (`--state-dir`): the agent's own, never the host's.
    pub state: tempfile::TempDir,
}

/// The STS client an in-process agent uses: moto (through the proxy) with the test
/// credentials (access key `testing`), as `settings` say (an intermediate role, say).
pub async fn sts_client(url: &str, settings: &StsClientSettings) -> AwsSts {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "iamlet-tests"))
        .load()
        .await;
    AwsSts::from_sdk_config(&sdk, settings).await
}

impl TestNode {
    /// Starts everything, with the agent given `args` on top of the defaults, and waits
    /// until the agent is ready.
    pub async fn start(args: &[&str]) -> Self {
        let api = FakeApiServer::start().await;
        Self::start_with_api(api, args).await
    }

    pub async fn start_with_api(api: FakeApiServer, args: &[&str]) -> Self {
        Self::start_with(api, FakeImds::start().await, args).await
    }

    /// Starts with this API server and this node metadata service.
    pub async fn start_with(api: FakeApiServer, imds: FakeImds, args: &[&str]) -> Self {
        let sts = StsProxy::start().await;
        let state = tempfile::tempdir().unwrap();
        let agent = start_agent(&api, &sts, &imds, state.path(), args).await;
        let node = Self { api, sts, imds, agent, state };
        node.wait_ready().await;
        node
    }

    pub fn app(&self) -> SocketAddr {
        self.agent.app_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.agent.admin_addr.expect("the admin port is served (--metrics-port differs from --app-port)")
    }

    /// `GET path` from the pod at `ip`.
    pub async fn get(&self, ip: &str, path: &str) -> Reply {
        pod_client::get(ip, self.app(), path).await
    }

    /// `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> Reply {
        pod_client::get("127.0.0.1", self.admin(), path).await
    }

    pub async fn wait_ready(&self) {
        eventually(10, "the agent to be ready", async || self.admin_get("/readyz").await.status == 200).await;
    }

    /// A metric's value (see [`crate::metric_value`]), 0 when not exported yet (a labelled
    /// counter appears with its first increment).
    pub async fn metric(&self, selector: &str) -> f64 {
        self.metric_exported(selector).await.unwrap_or(0.0)
    }

    /// Whether the metric `name` is exported yet (a gauge set at least once).
    pub async fn metric_exported(&self, name: &str) -> Option<f64> {
        crate::metric_value(&self.admin_get("/metrics").await.body, name)
    }
}

/// Starts an agent in this process against these fakes, with `args` on top of the loopback
/// defaults, on ports the kernel picks, keeping its state in `state` (`--state-dir`).
pub async fn start_agent(
    api: &FakeApiServer,
    sts: &StsProxy,
    imds: &FakeImds,
    state: &std::path::Path,
    args: &[&str],
) -> RunningAgent {
    let flags = AgentFlags::loopback(&api.url, &imds.addr).flag(format!("--state-dir={}", state.display())).with(args);
    let argv: Vec<String> = std::iter::once("iamlet".to_string()).chain(flags.args()).collect();
    let cli = Cli::try_parse_args(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let mut config = cli.agent.validate().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    config.settings.imds.app_port = 0;
    config.settings.admin.metrics_port = Some(0);
    let kube = iamlet::cluster::client::client(&config.settings.kube).await.unwrap();
    let sts = sts_client(&sts.url, &config.settings.sts.client(&config.node)).await.into_assumer();
    iamlet::app::start(config, Dependencies { kube, sts }).await.unwrap_or_else(|e| panic!("{}", iamlet::describe(&e)))
}
