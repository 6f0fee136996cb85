//! Exhaustion stays bounded: one pod opening connections in a loop, trickling its headers or
//! sending huge ones uses up its own share only; the other pods are answered promptly.

use std::time::{Duration, Instant};

use iamlet_testkit::apiserver::pod;
use iamlet_testkit::eventually;
use iamlet_testkit::node::TestNode;
use iamlet_testkit::pod_client::connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// Whether the server closed `stream` (EOF or reset) within `within`.
async fn closed(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // an answer (or an error response), then the close
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn one_pods_connections_never_crowd_out_another() {
    let node = TestNode::start(&["--max-connections-per-ip=4", "--header-read-timeout=30s"]).await;
    node.api.create_pod(pod("shop", "greedy").ip("127.0.0.70").role("app").build());
    node.api.create_pod(pod("shop", "polite").ip("127.0.0.71").role("app").build());
    assert_eq!(node.get("127.0.0.71", CREDS).await.status, 200);

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect("127.0.0.70", node.app()).await);
    }
    let mut fifth = connect("127.0.0.70", node.app()).await;
    assert!(closed(&mut fifth, Duration::from_secs(5)).await, "over the per-IP limit: closed at once");
    eventually(5, "the refusal to be counted", async || {
        node.metric("iamlet_connections_refused_total{reason=\"per-ip\"}").await >= 1.0
    })
    .await;

    let started = Instant::now();
    assert_eq!(node.get("127.0.0.71", CREDS).await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2), "the other pod is answered, not queued behind the greedy one");

    drop(held.pop());
    eventually(5, "the greedy pod's place to come back", async || {
        let mut stream = connect("127.0.0.70", node.app()).await;
        stream.write_all(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n").await.is_ok()
            && !closed(&mut stream, Duration::from_millis(300)).await
    })
    .await;
}

#[tokio::test]
async fn the_total_is_bounded_too() {
    let node =
        TestNode::start(&["--max-connections=3", "--max-connections-per-ip=2", "--header-read-timeout=30s"]).await;
    let _a = (connect("127.0.0.72", node.app()).await, connect("127.0.0.72", node.app()).await);
    let _b = connect("127.0.0.73", node.app()).await;
    let mut c = connect("127.0.0.74", node.app()).await;
    assert!(closed(&mut c, Duration::from_secs(5)).await);
    eventually(5, "the refusal to be counted", async || {
        node.metric("iamlet_connections_refused_total{reason=\"total\"}").await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn slow_or_huge_headers_are_cut_off() {
    let node = TestNode::start(&["--header-read-timeout=1s"]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.76").role("app").build());

    // Trickled headers (slowloris): closed after the header timeout.
    let mut slow = connect("127.0.0.75", node.app()).await;
    slow.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed(&mut slow, Duration::from_secs(5)).await);
    // The default (5 s) would not cut it before this; the 1 s timeout does, even on a busy machine.
    assert!(started.elapsed() < Duration::from_secs(4), "cut after about 1 s: {:?}", started.elapsed());

    // An idle keep-alive connection is closed the same way.
    let mut idle = connect("127.0.0.76", node.app()).await;
    idle.write_all(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0, "answered first");
    assert!(closed(&mut idle, Duration::from_secs(5)).await, "then closed once idle past the timeout");

    // A head over 16 KiB: refused, and the agent goes on serving.
    let mut huge = connect("127.0.0.75", node.app()).await;
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n", "a".repeat(40 * 1024));
    let _ = huge.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), huge.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(node.get("127.0.0.76", CREDS).await.status, 200);
}
