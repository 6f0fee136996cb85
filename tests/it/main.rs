//! iamlet's integration and end-to-end tests, one binary: one link of the AWS SDK, kube and
//! hyper instead of one per file, and one moto (`iamlet_testkit::moto`) for every test. One
//! module per concern.
//!
//! The end-to-end modules (`e2e_*`) need root and network namespaces: their tests are
//! `#[ignore]`d for plain `cargo test`, and `scripts/test.sh` runs them as root with
//! `--include-ignored` (in CI, not being root is an error, never a silent skip).

// Against the fake API server, moto and a fake node metadata service, over loopback.
mod churn;
mod exhaustion;
mod explain;
mod fleet;
mod handover;
mod imds_api;
mod node_protection;
mod pod_lifecycle;
mod sdk_clients;
mod service_accounts;
mod sts;

// The binary, its flags and its deployment files.
mod canary_script;
mod cli;
mod module_map;
mod monitoring;
mod podman_flags;
mod properties;

// End to end, as root, in network namespaces.
mod e2e_fail_closed;
mod e2e_image;
mod e2e_netns;
mod e2e_spoofing;
mod e2e_upgrade;
