//! The end-to-end harness: a node namespace with the fakes on the node's address, the
//! node's real metadata service on the EC2 host behind its uplink (answering IMDSv1 too, the
//! worst case, with secrets a test can recognise), the agent as a process, and real SDK
//! clients run inside pod namespaces.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sts::config::{ProvideCredentials, Region};
use serde_json::{Value, json};

use crate::agent::{AgentCommand, AgentProcess};
use crate::apiserver::{FakeApiServer, pod};
use crate::flags::AgentFlags;
use crate::imds::{FakeImds, NODE_SECRETS, Tokens};
use crate::moto::venv_bin;
use crate::netns::{Attach, HOST_IP, METADATA_IP, Netns, Topology, require_root};
use crate::pod_client;
use crate::sts_proxy::StsProxy;

/// The agent's own pod and its DaemonSet, as the base manifest names them.
pub const AGENT_NAMESPACE: &str = "kube-system";
pub const AGENT_POD: &str = "iamlet-x7k2p";
pub const DAEMONSET: &str = "iamlet";

/// A node namespace with the fakes listening on the node's address, and its pods.
pub struct E2e {
    pub topology: Topology,
    pub api: FakeApiServer,
    pub sts: StsProxy,
    /// The node's real metadata service, at 169.254.169.254:80 on the EC2 host.
    pub imds: FakeImds,
    /// The CNI configuration directory the agent reads (empty unless a test writes one).
    pub cni_conf: tempfile::TempDir,
    /// The node's state directory (`--state-dir`), shared by the agents that succeed one
    /// another on it.
    pub state: tempfile::TempDir,
}

impl E2e {
    pub fn new(tag: &str) -> Self {
        require_root();
        let topology = Topology::node(tag);
        let api =
            FakeApiServer::start_on(topology.node.listen(&format!("{HOST_IP}:6443")), None, Duration::from_secs(1));
        let sts = StsProxy::start_on(topology.node.listen(&format!("{HOST_IP}:0")));
        let imds = FakeImds::start_with(topology.ec2.listen(&format!("{METADATA_IP}:80")), Tokens::Optional);
        api.put_node("node-a", json!({"kubernetes.io/os": "linux"}), json!([]));
        Self { topology, api, sts, imds, cni_conf: tempfile::tempdir().unwrap(), state: tempfile::tempdir().unwrap() }
    }

    pub fn node(&self) -> &Netns {
        &self.topology.node
    }

    /// The agent's flags in the node: the API server and STS on the node's address, the
    /// node's metadata service where EC2 has it, iptables rules synced every second.
    pub fn flags(&self, extra: &[&str]) -> AgentFlags {
        AgentFlags::new(&self.api.url, HOST_IP)
            .flag(format!("--cni-conf-dir={}", self.cni_conf.path().display()))
            .flag(format!("--cni-results-dir={}", self.topology.cni_results.path().display()))
            .flag(format!("--state-dir={}", self.state.path().display()))
            .flag("--iptables")
            .flag("--iptables-sync-period=1s")
            .with(extra)
    }

    /// The agent in the node, not yet started.
    pub fn agent(&self, extra: &[&str]) -> AgentCommand {
        AgentCommand::new(self.flags(extra), &self.sts.url).in_netns(self.node())
    }

    /// Starts the agent, not as a DaemonSet's pod, and waits until it is ready.
    pub async fn start_agent(&self, extra: &[&str]) -> AgentProcess {
        let mut agent = self.agent(extra).spawn();
        agent.wait_ready().await;
        agent
    }

    /// The DaemonSet (running on every node, as the base manifest's does) and the agent's
    /// pod it owns, in the API server.
    pub fn install_daemonset(&self) {
        self.api.put_daemonset(
            AGENT_NAMESPACE,
            DAEMONSET,
            json!({"hostNetwork": true, "tolerations": [{"operator": "Exists"}], "containers": [{"name": "iamlet"}]}),
        );
        self.add_agent_pod(AGENT_POD);
    }

    /// Another pod of the DaemonSet on the node (a surge update's successor), in the API
    /// server, as the DaemonSet controller creates it.
    pub fn add_agent_pod(&self, name: &str) {
        self.api
            .create_pod(pod(AGENT_NAMESPACE, name).ip(HOST_IP).host_network().owned_by_daemonset(DAEMONSET).build());
    }

    /// Starts the agent as the DaemonSet's pod (`POD_NAME`, `POD_NAMESPACE` from the
    /// downward API) and waits until it is ready.
    pub async fn start_daemonset_agent(&self, extra: &[&str]) -> AgentProcess {
        let mut agent = self.agent(extra).env("POD_NAMESPACE", AGENT_NAMESPACE).env("POD_NAME", AGENT_POD).spawn();
        agent.wait_ready().await;
        agent
    }

    /// A pod namespace attached to the node, the CNI's record of it (as libcni writes it),
    /// and the pod object in the API server.
    pub fn add_pod(&mut self, link: &str, attach: Attach, ip: &str, role: Option<&str>) -> usize {
        self.add_dual_stack_pod(link, attach, (ip, None), role)
    }

    /// [`E2e::add_pod`] with an IPv6 address too (on a bridge).
    pub fn add_dual_stack_pod(
        &mut self,
        link: &str,
        attach: Attach,
        ips: (&str, Option<&str>),
        role: Option<&str>,
    ) -> usize {
        // The CNI's record comes first, as on a node: the address reaches the API server after.
        let index = self.add_pod_network(link, attach, ips);
        self.create_pod_object(index, role);
        index
    }

    /// What the runtime and the CNI do for a new pod `pod-<link>`: its network namespace
    /// behind `link`, and libcni's record of it. The API server does not know it yet.
    pub fn add_pod_network(&mut self, link: &str, attach: Attach, ips: (&str, Option<&str>)) -> usize {
        self.topology.add_pod(link, attach, ips.0, ips.1);
        let index = self.topology.pods.len() - 1;
        let (name, uid) = pod_name(link, index);
        self.topology.record_pod(index, link, attach, ("e2e", &name, &uid));
        index
    }

    /// The pod object of the pod at `index` (`pod-<link>`, in namespace `e2e`), with `role`.
    pub fn create_pod_object(&mut self, index: usize, role: Option<&str>) {
        let net = &self.topology.pods[index];
        let link = net.link.clone();
        let all: Vec<&str> = [Some(net.ip.as_str()), net.ipv6.as_deref()].into_iter().flatten().collect();
        let (name, uid) = pod_name(&link, index);
        let mut object = pod("e2e", &name).ips(&all);
        if let Some(role) = role {
            object = object.role(role);
        }
        let mut object = object.build();
        object["metadata"]["uid"] = json!(uid);
        self.api.create_pod(object);
    }

    pub fn pod_ns(&self, index: usize) -> &Netns {
        &self.topology.pods[index].ns
    }

    /// iamlet's jumps in PREROUTING and rules in its nat chain, from both backends.
    pub fn our_rules(&self, family: &str) -> (usize, usize) {
        count_ours(&self.node().nat_rules(family), "PREROUTING")
    }

    /// iamlet's jumps in FORWARD and rules in its filter chain (the backstop), both backends.
    pub fn our_backstop(&self, family: &str) -> (usize, usize) {
        count_ours(&self.node().table_rules(family, "filter"), "FORWARD")
    }

    /// iamlet's pod port binding on a bridge: the `(port, MAC, address)` elements of its
    /// `bridge iamlet` table, or `None` when there is no such table.
    pub fn our_binding(&self) -> Option<String> {
        let output = self.node().exec("nft", &["list", "set", "bridge", "iamlet", "bound4"]);
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The Node's taints as the API server has them.
    pub fn taint_keys(&self) -> Vec<String> {
        let node = self.api.node("node-a").unwrap();
        node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["key"].as_str().map(String::from))
            .collect()
    }
}

/// The name and uid of the pod behind `link`.
fn pod_name(link: &str, index: usize) -> (String, String) {
    let name = format!("pod-{link}");
    let uid = format!("uid-e2e-{index}-{name}");
    (name, uid)
}

fn count_ours(listing: &str, base: &str) -> (usize, usize) {
    let jumps = listing.lines().filter(|l| l.starts_with(&format!("-A {base} ")) && l.ends_with("-j IAMLET")).count();
    let chain = listing.lines().filter(|l| l.starts_with("-A IAMLET ")).count();
    (jumps, chain)
}

/// What a pod's plain request to the metadata address got: an answer (status, body), or the
/// connection error (refused, reset) as text. Never hangs more than `timeout`.
pub async fn pod_request(pod: &Netns, path: &'static str, timeout: Duration) -> Result<(u16, String), String> {
    pod.run(move || async move {
        let imds: SocketAddr = format!("{METADATA_IP}:80").parse().unwrap();
        pod_client::try_fetch(imds, path, &[], timeout).await.map(|r| (r.status, r.body))
    })
    .await
}

/// Fails the test if `text` holds any secret of the node.
pub fn assert_no_node_secret(text: &str) {
    for secret in NODE_SECRETS {
        assert!(!text.contains(secret), "a pod got the node's secret {secret}: {text}");
    }
}

/// botocore's default chain in a pod namespace; (exit code, its JSON line).
pub fn botocore_in(pod: &Netns, sts_url: &str, env: &[(&str, &str)]) -> (i32, Value) {
    let python = venv_bin("python");
    let script = crate::repo_root().join("tests/clients/botocore_identity.py");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &pod.name, python.to_str().unwrap(), script.to_str().unwrap()])
        .env_clear()
        .envs(crate::clean_sdk_env())
        .env("STS_URL", sts_url);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("botocore printed {stdout:?}; stderr {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code().unwrap_or(-1), parsed)
}

/// botocore's `InstanceMetadataFetcher` asking for the pod's credentials in a loop
/// (`tests/clients/imds_loop.py`), one object throughout, with its defaults (1 s, 1 attempt),
/// until a stop file appears; killed if the test fails first.
pub struct BotocoreLoop(Option<std::process::Child>);

impl BotocoreLoop {
    /// Starts it in `pod`'s namespace (or here), asking `endpoint` (`http://host:port/`)
    /// until `stop` exists.
    pub fn start(pod: Option<&Netns>, endpoint: &str, stop: &std::path::Path) -> Self {
        let python = venv_bin("python");
        let script = crate::repo_root().join("tests/clients/imds_loop.py");
        let mut command = match pod {
            Some(pod) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &pod.name, python.to_str().unwrap()]);
                command
            }
            None => Command::new(python),
        };
        let child = command
            .arg(script)
            .env_clear()
            .envs(crate::clean_sdk_env())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
            .env("STOP_FILE", stop)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running python");
        Self(Some(child))
    }

    /// Stops it (creating `stop`) and returns its summary: `served`, and `failures`.
    pub async fn finish(mut self, stop: &std::path::Path) -> Value {
        std::fs::write(stop, "").unwrap();
        let child = self.0.take().expect("finished once");
        let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        serde_json::from_slice(&output.stdout).expect("botocore's summary")
    }
}

impl Drop for BotocoreLoop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `aws sts get-caller-identity` in a pod namespace: the caller ARN, or the CLI's error.
pub fn aws_cli_in(pod: &Netns, sts_url: &str) -> Result<String, String> {
    let aws = venv_bin("aws");
    let output = Command::new("ip")
        .args(["netns", "exec", &pod.name, aws.to_str().unwrap()])
        .args(["sts", "get-caller-identity", "--region", "us-east-1", "--output", "json", "--endpoint-url", sts_url])
        .env_clear()
        .envs(crate::clean_sdk_env())
        .output()
        .unwrap();
    if output.status.success() {
        let identity: Value = serde_json::from_slice(&output.stdout).unwrap();
        Ok(identity["Arn"].as_str().unwrap().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// aws-config's IMDS credential provider in a pod namespace, then GetCallerIdentity.
pub async fn rust_sdk_in(pod: &Netns, sts_url: String) -> Result<String, String> {
    pod.run(move || async move {
        let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder().build();
        let credentials = provider.provide_credentials().await.map_err(|e| format!("{e:?}"))?;
        let config = aws_sdk_sts::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(sts_url)
            .credentials_provider(credentials)
            .build();
        let identity =
            aws_sdk_sts::Client::from_conf(config).get_caller_identity().send().await.map_err(|e| format!("{e:?}"))?;
        Ok(identity.arn.unwrap_or_default())
    })
    .await
}

/// Whether anything answers a pod's metadata request within a second.
pub async fn metadata_answers(pod: &Netns) -> bool {
    pod.run(|| async {
        let imds: SocketAddr = "169.254.169.254:80".parse().unwrap();
        pod_client::fetch(imds, "/latest/meta-data/iam/security-credentials/", &[], Duration::from_secs(1))
            .await
            .is_some()
    })
    .await
}

/// What an attacker pod holding only `CAP_NET_RAW` gets when it passes for `victim`
/// (`(ip, mac)`) on a bridge: `tests/clients/spoof_attack.py` in `--mode arp` (the node's
/// neighbour entry) or `mac` (the bridge's forwarding entry), TCP over a raw socket to the
/// `target` (`ip:port`: the metadata address, or the agent's own) for `path`; `syn` only
/// forges one SYN. With `vlan_tags`, the frames carry priority tags (VLAN 0), which a bridge
/// that is not VLAN-aware strips on the way to the node. `{"answered": false}`, the HTTP
/// response it read, or `{"sport": N}`.
pub fn spoof_attack(
    attacker: &Netns,
    mode: &str,
    victim: (&str, &str),
    gateway: (&str, &str),
    path: &str,
    target: &str,
    vlan_tags: usize,
) -> Value {
    let python = venv_bin("python");
    let script = crate::repo_root().join("tests/clients/spoof_attack.py");
    let output = Command::new("ip")
        .args(["netns", "exec", &attacker.name, "setpriv", "--bounding-set=-all,+net_raw", "--inh-caps=-all"])
        .args([python.to_str().unwrap(), script.to_str().unwrap(), "--mode", mode])
        .args([
            "--victim-ip",
            victim.0,
            "--victim-mac",
            victim.1,
            "--gateway-ip",
            gateway.0,
            "--gateway-mac",
            gateway.1,
        ])
        .args(["--path", path, "--target", target, "--vlan-tags", &vlan_tags.to_string()])
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!("the attacker printed {stdout:?}; stderr {}", String::from_utf8_lossy(&output.stderr))
    })
}
