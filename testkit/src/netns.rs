//! Network namespaces for the end-to-end tests: a "node" and its "pods", wired like a CNI
//! would wire them, all created inside namespaces the test owns (the host's own links and
//! netfilter tables are never touched) and deleted when the test ends.

use std::future::Future;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fails the test unless it runs as root (the e2e tests are `#[ignore]`d otherwise, and
/// scripts/test.sh runs them as root).
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "end-to-end tests need root: run scripts/test.sh as root");
}

/// A unique prefix for this test's namespaces.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!("iamlet-{}-{}-{tag}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn check(output: Output, what: &str) -> String {
    assert!(output.status.success(), "`{what}` failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Self {
        let _ = run("ip", &["netns", "del", name]);
        check(run("ip", &["netns", "add", name]), &format!("ip netns add {name}"));
        let ns = Self { name: name.to_string() };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &str) {
        let mut argv = vec!["-n", &self.name];
        argv.extend(args.split_whitespace());
        check(run("ip", &argv), &format!("ip -n {} {args}", self.name));
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut argv = vec!["netns", "exec", &self.name, program];
        argv.extend_from_slice(args);
        run("ip", &argv)
    }

    /// Runs a program inside the namespace, which must succeed; returns its stdout.
    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        check(self.exec(program, args), &format!("{program} {}", args.join(" ")))
    }

    pub fn sysctl(&self, setting: &str) {
        self.ok("sysctl", &["-q", "-w", setting]);
    }

    /// Runs `make()`'s future on a thread that has entered this namespace, with a runtime of
    /// its own: every socket it opens is in the namespace.
    pub async fn run<F, Fut, T>(&self, make: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        run_in(&self.name, make).await
    }

    /// A listener bound inside the namespace, served by the caller's runtime.
    pub fn listen(&self, addr: &str) -> tokio::net::TcpListener {
        let path = format!("/run/netns/{}", self.name);
        let addr = addr.to_string();
        let listener = std::thread::spawn(move || {
            enter(&path);
            std::net::TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        })
        .join()
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(listener).unwrap()
    }

    /// `iptables -S`-style rules of the nat table, from both backends.
    pub fn nat_rules(&self, family: &str) -> String {
        self.table_rules(family, "nat")
    }

    /// `iptables -S`-style rules of `table`, from both backends.
    pub fn table_rules(&self, family: &str, table: &str) -> String {
        let tool = if family == "v6" { "ip6tables" } else { "iptables" };
        let mut all = String::new();
        for program in [format!("{tool}-nft"), format!("{tool}-legacy")] {
            all.push_str(&String::from_utf8_lossy(&self.exec(&program, &["-w", "-t", table, "-S"]).stdout));
        }
        all
    }
}

/// [`Netns::run`] by the namespace's name, for a holder that does not own the namespace.
pub async fn run_in<F, Fut, T>(name: &str, make: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{name}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        enter(&path);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = tx.send(runtime.block_on(make()));
    });
    rx.await.expect("the namespace thread panicked")
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// The node's own address (on `eth0`, as on a node's main interface), where the agent,
/// the fake API server and STS listen.
pub const HOST_IP: &str = "10.254.0.1";
pub const HOST_IPV6: &str = "fd00:1::1";

/// How a pod is attached to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// flannel / bridge CNI: a veth enslaved to the `cni0` bridge (10.42.0.0/24, fd42::/64).
    Bridge,
    /// Calico: a point-to-point veth with a /32 route and proxy ARP.
    PointToPoint,
}

/// A pod's network namespace and addresses.
pub struct PodNet {
    pub ns: Netns,
    /// The node-side end of its link.
    pub link: String,
    pub ip: String,
    pub ipv6: Option<String>,
}

/// The metadata address, where the "EC2 host" namespace answers behind the node's uplink.
pub const METADATA_IP: &str = "169.254.169.254";

/// A node namespace, the "EC2 host" behind its uplink, and its pods.
pub struct Topology {
    pub node: Netns,
    /// Behind the node's `eth0`: holds 169.254.169.254, where the node's real metadata
    /// service answers (start one with [`Netns::listen`] on `169.254.169.254:80`).
    pub ec2: Netns,
    pub pods: Vec<PodNet>,
    /// libcni's result cache as containerd keeps it (`/var/lib/cni/results`): one record per
    /// pod, written by [`Topology::record_pod`] as the CNI's ADD would.
    pub cni_results: tempfile::TempDir,
    prefix: String,
}

impl Topology {
    /// A node with its main interface and a `cni0` bridge, and no pods yet. Like a real
    /// node, it forwards, and routes 169.254.169.254 out of `eth0` to the EC2 host: pod
    /// traffic that iamlet does not intercept reaches the node's metadata service there.
    pub fn node(tag: &str) -> Self {
        let prefix = unique(tag);
        let node = Netns::create(&format!("{prefix}-node"));
        let ec2 = Netns::create(&format!("{prefix}-ec2"));
        // The node's main interface: a veth (this kernel may lack the dummy driver) whose
        // peer is the EC2 host's side.
        node.ip(&format!("link add eth0 type veth peer name uplink0 netns {}", ec2.name));
        node.ip(&format!("addr add {HOST_IP}/32 dev eth0"));
        node.ip(&format!("addr add {HOST_IPV6}/128 dev eth0 nodad"));
        node.ip("link set eth0 up");
        // A default route, as every node has: proxy ARP (Calico) answers only for addresses
        // the node can route elsewhere.
        node.ip("route add default dev eth0");
        node.sysctl("net.ipv4.ip_forward=1");
        ec2.ip(&format!("addr add {METADATA_IP}/32 dev uplink0"));
        ec2.ip("link set uplink0 up");
        ec2.ip(&format!("route add {HOST_IP} dev uplink0"));
        ec2.ip(&format!("route add default via {HOST_IP} dev uplink0"));
        node.ip("link add cni0 type bridge");
        node.ip("addr add 10.42.0.1/24 dev cni0");
        node.ip("addr add fd42::1/64 dev cni0 nodad");
        node.ip("link set cni0 up");
        Self { node, ec2, pods: Vec::new(), cni_results: tempfile::tempdir().unwrap(), prefix }
    }

    /// Adds a pod behind the node-side interface `link`, with `ip` (and `ipv6` on a bridge).
    pub fn add_pod(&mut self, link: &str, attach: Attach, ip: &str, ipv6: Option<&str>) -> &PodNet {
        let ns = Netns::create(&format!("{}-pod{}", self.prefix, self.pods.len()));
        let node = &self.node;
        node.ip(&format!("link add {link} type veth peer name eth0 netns {}", ns.name));
        node.ip(&format!("link set {link} up"));
        // No router advertises here: without this the pod solicits one every few seconds
        // for ever, frames the bridge learns from at moments no test chose.
        ns.sysctl("net.ipv6.conf.eth0.router_solicitations=0");
        ns.ip("link set eth0 up");
        match attach {
            Attach::Bridge => {
                node.ip(&format!("link set {link} master cni0"));
                ns.ip(&format!("addr add {ip}/24 dev eth0"));
                ns.ip("route add default via 10.42.0.1");
                if let Some(v6) = ipv6 {
                    ns.ip(&format!("addr add {v6}/64 dev eth0 nodad"));
                    ns.ip("-6 route add default via fd42::1");
                }
            }
            Attach::PointToPoint => {
                node.ip(&format!("route add {ip}/32 dev {link}"));
                // Calico's wiring: proxy ARP for the pod's gateway 169.254.1.1, which the
                // kernel only answers on an interface that forwards.
                node.sysctl(&format!("net.ipv4.conf.{link}.proxy_arp=1"));
                node.sysctl(&format!("net.ipv4.conf.{link}.forwarding=1"));
                ns.ip(&format!("addr add {ip}/32 dev eth0"));
                ns.ip("route add 169.254.1.1 dev eth0 scope link");
                ns.ip("route add default via 169.254.1.1 dev eth0");
            }
        }
        self.pods.push(PodNet { ns, link: link.to_string(), ip: ip.to_string(), ipv6: ipv6.map(str::to_string) });
        self.pods.last().unwrap()
    }
}

/// The MAC of `device` in `ns`.
pub fn mac_of(ns: &Netns, device: &str) -> String {
    let link = ns.ok("ip", &["-o", "link", "show", device]);
    let after = link.split("link/ether ").nth(1).unwrap_or_else(|| panic!("{device} has no MAC: {link}"));
    after.split_whitespace().next().unwrap().to_string()
}

impl Topology {
    /// Writes what libcni keeps after the CNI's ADD for the pod at `index` behind `link`
    /// (`namespace/name`, `uid`): the bridge plugin's result on a bridge (the bridge, the host
    /// veth, the pod's `eth0` with its MAC and sandbox), the routed plugins' (host veth, then
    /// the pod's side) on a point-to-point link. Returns the record's path.
    pub fn record_pod(&self, index: usize, link: &str, attach: Attach, pod: (&str, &str, &str)) -> std::path::PathBuf {
        let net = &self.pods[index];
        let ips: Vec<&str> = [Some(net.ip.as_str()), net.ipv6.as_deref()].into_iter().flatten().collect();
        let record = CniRecord {
            container: format!("{:064x}", 0xc0ffee_u128 + index as u128),
            bridge: (attach == Attach::Bridge).then(|| mac_of(&self.node, "cni0")),
            host: (link.to_string(), mac_of(&self.node, link)),
            pod_mac: mac_of(&net.ns, "eth0"),
            sandbox: format!("/var/run/netns/{}", net.ns.name),
            ips: &ips,
            pod,
        };
        record.write(self.cni_results.path())
    }
}

/// One entry of libcni's result cache, as containerd writes it after the CNI's ADD: the bridge
/// plugin's result when `bridge` (its MAC) is given (the bridge, the host veth, the pod's
/// `eth0`), else the routed plugins' (host veth, then the pod's side).
pub struct CniRecord<'a> {
    pub container: String,
    pub bridge: Option<String>,
    /// The host side of the pod's link, and its MAC.
    pub host: (String, String),
    pub pod_mac: String,
    pub sandbox: String,
    pub ips: &'a [&'a str],
    /// namespace, name, uid.
    pub pod: (&'a str, &'a str, &'a str),
}

impl CniRecord<'_> {
    /// Writes it into `dir` under libcni's name for it; returns the path.
    pub fn write(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let (namespace, name, uid) = self.pod;
        let pod_side = serde_json::json!({"name": "eth0", "mac": self.pod_mac, "sandbox": self.sandbox});
        let host_side = serde_json::json!({"name": self.host.0, "mac": self.host.1});
        let (network, interfaces, pod_index) = match &self.bridge {
            Some(mac) => ("cbr0", serde_json::json!([{"name": "cni0", "mac": mac}, host_side, pod_side]), 2),
            None => ("k8s-pod-network", serde_json::json!([host_side, pod_side]), 1),
        };
        let ips: Vec<serde_json::Value> = self
            .ips
            .iter()
            .map(|ip| {
                let prefix = if ip.contains(':') { 64 } else { 32 };
                serde_json::json!({"interface": pod_index, "address": format!("{ip}/{prefix}")})
            })
            .collect();
        let container = &self.container;
        let record = serde_json::json!({
            "kind": "cniCacheV1", "containerId": container, "config": "e30=", "ifName": "eth0",
            "networkName": network,
            "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", namespace], ["K8S_POD_NAME", name],
                        ["K8S_POD_INFRA_CONTAINER_ID", container], ["K8S_POD_UID", uid]],
            "result": {"cniVersion": "1.0.0", "interfaces": interfaces, "ips": ips, "dns": {}},
        });
        let path = dir.join(format!("{network}-{container}-eth0"));
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        path
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pods first: deleting a namespace deletes its end of each veth, and the peer with it.
        self.pods.clear();
    }
}
