//! The image, as the DaemonSet runs it: the container built by `scripts/image.sh` from the
//! Dockerfile's runtime stage, in the node's network namespace, with the security context of
//! the rendered base manifest. scripts/test.sh builds it and sets `IAMLET_IMAGE`; every
//! other end-to-end test then runs the agent as this container too.

use iamlet_testkit::e2e::{E2e, botocore_in};
use iamlet_testkit::netns::Attach;

/// A capability set as `/proc/<pid>/status` shows it.
fn capabilities(status: &str, field: &str) -> u64 {
    let hex = status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("{field} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// CAP_NET_ADMIN (12) and CAP_NET_RAW (13).
const NET_ADMIN_AND_RAW: u64 = (1 << 12) | (1 << 13);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, podman and IAMLET_IMAGE: scripts/test.sh builds the image and runs it"]
async fn the_container_runs_confined_serves_a_pod_and_podman_stop_removes_its_rules() {
    assert!(
        iamlet_testkit::container::image().is_some(),
        "IAMLET_IMAGE names no image: scripts/test.sh builds it (scripts/image.sh build) and sets it"
    );
    let mut e2e = E2e::new("image");
    let app = e2e.add_pod("veth1", Attach::Bridge, "10.42.0.10", Some("e2e-app"));
    let agent = e2e.start_agent(&["--host-interface=cni0"]).await;
    assert!(agent.in_container());

    // What the kernel says of the agent's process, not what podman was asked.
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(capabilities(&status, "CapEff:"), NET_ADMIN_AND_RAW, "only NET_ADMIN and NET_RAW:\n{status}");
    assert_eq!(capabilities(&status, "CapBnd:"), NET_ADMIN_AND_RAW, "nothing else can be gained");
    assert!(status.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["NoNewPrivs:", "1"]), "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("the root mount");
    assert!(root.split_whitespace().nth(5).unwrap().split(',').any(|o| o == "ro"), "a read-only root: {root}");
    assert!(mounts.lines().any(|l| l.split_whitespace().nth(4) == Some("/run/xtables.lock")), "the host's lock");

    // A pod gets its role through the container, and the rules are in the node.
    let (code, result) = botocore_in(e2e.pod_ns(app), &e2e.sts.url, &[]);
    assert_eq!(code, 0, "{result}\n{}", agent.log());
    assert!(result["arn"].as_str().unwrap().ends_with(":assumed-role/e2e-app/e2e.pod-veth1"), "{result}");
    assert_eq!(e2e.our_rules("v4"), (1, 1));

    // `podman stop`: the agent drains and, not being a DaemonSet's pod, removes its rules.
    agent.terminate().await;
    assert_eq!(e2e.our_rules("v4"), (0, 0), "{}", e2e.node().nat_rules("v4"));
    assert_eq!(e2e.our_backstop("v4"), (0, 0), "{}", e2e.node().table_rules("v4", "filter"));
}
