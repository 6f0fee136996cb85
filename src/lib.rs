//! iamlet: a per-node agent that gives every Kubernetes pod the AWS IAM role named on it.
//!
//! Pods reach the EC2 instance metadata service (IMDS) at 169.254.169.254 like on any EC2
//! instance; iamlet answers in its place, so the standard SDK credential chain hands each pod
//! the credentials of *its* role instead of the node's.
//!
//! A request's path, from the source IP to the credentials document:
//! 1. [`http::serve`] accepts the connection (within its limits) and hands the request to
//!    [`imds::ImdsService`], which classifies the path ([`imds::routes`]) and checks the token;
//! 2. [`cluster::PodStore`] maps the source IP to its pod, waiting briefly for the watch;
//! 3. [`resolve::Resolver`] gives the pod's role (its annotation, its ServiceAccount's, or
//!    the default) and credential key (session name and tags included), or a typed denial;
//! 4. [`credentials::CredentialCache`] returns the key's credentials, fetched with STS ahead;
//! 5. [`imds::render`] writes them as IMDS would, rendered once per credential.
//!
//! The modules, each with one concern:
//!
//! | module | concern |
//! |---|---|
//! | [`cli`] | kube2iam-compatible flags, validated into a [`cli::Config`] |
//! | [`app`] | startup order, the tasks, graceful shutdown; [`app::StartupError`], where the modules' errors meet |
//! | [`cluster`] | the pods on this node (watch → [`cluster::PodIndex`]), namespace annotations, ServiceAccount roles, whether the agent's DaemonSet will run a successor here, the startup taint |
//! | [`pod`] | what iamlet keeps of a pod ([`pod::PodIdentity`]), shared by all |
//! | [`policy`] | which role a pod may have: annotation, ServiceAccount role, default role, base ARN, namespace rules |
//! | [`resolve`] | the one answer to "which role and credential key for this pod": policy, namespace and ServiceAccount views, session rules and tags |
//! | [`credentials`] | STS AssumeRole (directly or through an intermediate role) under the node's budget, retried when throttled, the credential cache, prefetch and refresh-ahead |
//! | [`imds`] | the metadata API pods see: routes, IMDSv2 tokens, the allow-listed proxy |
//! | [`explain`] | `iamlet explain <namespace>/<pod>`: the role a pod gets and why |
//! | [`handover`] | a successor taking over from its predecessor on the node: listening sockets, cached credentials, the rules |
//! | [`admin`] | `/healthz`, `/readyz`, `/metrics`, `/debug/store` on a separate port |
//! | [`metrics`] | the Prometheus metrics every module records into |
//! | [`ports`] | which port on the node each pod address belongs to, from the CNI's records (libcni's result cache) |
//! | [`netfilter`] | the DNAT and its backstop: install, check and repair, keep or remove on exit; the pod port binding (nftables); CNI detection, connection reset, the coverage check |
//! | [`shutdown`] | signals: the first drains, a second aborts |
//! | [`state`] | the agent's root-only state directory on the node (`--state-dir`): what outlives one process but never the node's boot |
//! | [`clock`] | wall-clock time for credentials: the system's, or one following tokio's paused clock (tests, the fleet simulation) |
//! | [`http`] | the HTTP serving loop both ports share, with its limits and graceful drain |
//!
//! Dependencies point one way: the order, and what each module may import, is the module map
//! in CONTRIBUTING.md, which a test checks against every import. Pure logic (policy, ARNs,
//! tokens, routes, index updates, session names) is plain functions over plain data and is
//! unit-tested without I/O; the I/O lives at the edges.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod credentials;
pub mod explain;
pub mod handover;
pub mod http;
pub mod imds;
pub mod metrics;
pub mod netfilter;
pub mod pod;
pub mod policy;
pub mod ports;
pub mod resolve;
pub mod shutdown;
pub mod state;

/// An error and its sources on one line (`what: why: why`), for logs and the terminal. A
/// source whose text its parent already shows (many libraries print their source too) is
/// not repeated.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn describe_shows_each_source_once() {
        let io = std::io::Error::other("disk gone");
        let wrapped = anyhow::Error::new(io).context("reading the kubeconfig");
        assert_eq!(super::describe(wrapped.as_ref()), "reading the kubeconfig: disk gone");
        let repeating = anyhow::anyhow!("inner").context("outer: inner");
        assert_eq!(super::describe(repeating.as_ref()), "outer: inner");
    }
}
