//! Pod churn: thousands of pods created, asked for credentials and deleted, some while their
//! requests are in flight. No answer carries another pod's role, and nothing of a departed pod
//! stays behind: no index entry, no cached key (which would be refreshed with STS forever),
//! whether the key was prefetched or made by a request, and whether its fetch was still under
//! way when the pod went.

use iamlet_testkit::apiserver::pod;
use iamlet_testkit::eventually;
use iamlet_testkit::node::TestNode;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_crosses_no_roles_and_leaves_nothing_of_departed_pods() {
    const ROUNDS: usize = 8;
    const PODS: usize = 250;
    // The budget lifted: the burst is meant to reach STS (moto) at once.
    let node = TestNode::start(&[
        "--debug",
        "--sts-timeout=4s",
        "--sts-concurrency=32",
        "--sts-max-rps=10000",
        "--sts-burst=10000",
    ])
    .await;
    let app = node.app();
    for round in 0..ROUNDS {
        let pods: Vec<(String, String)> = (0..PODS)
            .map(|i| (format!("p{round}-{i}"), format!("127.{}.{}.{}", 100 + round, i / 200, 10 + i % 200)))
            .collect();
        for (name, ip) in &pods {
            node.api.create_pod(pod("churn", name).ip(ip).role(&format!("role-{name}")).build());
        }
        let asks: Vec<_> = pods
            .iter()
            .map(|(name, ip)| {
                let (name, ip) = (name.clone(), ip.clone());
                tokio::spawn(async move {
                    let reply = iamlet_testkit::pod_client::get(&ip, app, &format!("{CREDS}role-{name}")).await;
                    (name, reply)
                })
            })
            .collect();
        // Half the pods go while their requests are in flight.
        for (name, _) in pods.iter().step_by(2) {
            node.api.delete_pod("churn", name);
        }
        for ask in asks {
            let (name, reply) = ask.await.unwrap();
            // 200 only for the pod's own role (the route checks it); otherwise the pod was gone
            // or unknown yet (404), or STS could not keep up with the burst (503, try again):
            // never another pod's credentials.
            assert!([200, 404, 503].contains(&reply.status), "{name}: {reply:?}");
            if reply.status == 404 {
                assert!(!reply.body.contains("role is role-"), "{name}: {}", reply.body);
            }
        }
        for (name, _) in pods.iter().skip(1).step_by(2) {
            node.api.delete_pod("churn", name);
        }
        // Each round's keys go with its pods, long before the refresh scan (every 30 s) could
        // catch them: this is the prefetcher forgetting, not that safety net.
        let prefix = format!("churn.p{round}-");
        eventually(15, "the round's keys to be forgotten", async || {
            let store = node.admin_get("/debug/store").await.json();
            let credentials = store["credentials"].as_array().cloned().unwrap_or_default();
            !credentials.iter().any(|c| c["session"].as_str().is_some_and(|s| s.starts_with(&prefix)))
        })
        .await;
    }
    eventually(20, "every pod and every cached key to be gone", async || {
        let store = node.admin_get("/debug/store").await.json();
        store["pods"].as_array().is_some_and(|p| p.is_empty())
            && store["credentials"].as_array().is_some_and(|c| c.is_empty())
    })
    .await;
    assert_eq!(node.metric("iamlet_pods_indexed").await, 0.0);
    // With no key left, nothing of a departed pod can be refreshed: the refresh scan only
    // walks cached keys (and drops any whose pod is gone, see the cache's unit tests).
}
