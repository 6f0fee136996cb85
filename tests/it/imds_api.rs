//! The metadata API as pods see it: role paths, credential documents, IMDSv2 tokens, the
//! allow-listed proxy, and what is never served. STS is moto; the pods are loopback IPs.

use std::time::{Duration, SystemTime};

use iamlet_testkit::apiserver::pod;
use iamlet_testkit::imds::NODE_SECRETS;
use iamlet_testkit::node::TestNode;
use iamlet_testkit::pod_client::{self, request, token};
use iamlet_testkit::role_arn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn assert_no_node_secret(body: &str) {
    for secret in NODE_SECRETS {
        assert!(!body.contains(secret), "node secret {secret} leaked: {body}");
    }
}

#[tokio::test]
async fn a_role_by_name_or_full_arn_gets_its_credentials() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.2").role("app").build());
    let other_account = "arn:aws:iam::210987654321:role/team/other";
    node.api.create_pod(pod("shop", "batch").ip("127.0.0.3").role(other_account).build());

    for path in [CREDS, "/latest/meta-data/iam/security-credentials"] {
        let reply = node.get("127.0.0.2", path).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "app"), "{path}");
        assert_eq!(reply.header("content-type"), Some("text/plain"));
    }
    for path in [format!("{CREDS}app"), format!("{CREDS}app/")] {
        let reply = node.get("127.0.0.2", &path).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        let doc = reply.json();
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["Type"], "AWS-HMAC");
        for field in ["AccessKeyId", "SecretAccessKey", "Token", "LastUpdated"] {
            assert!(doc[field].as_str().is_some_and(|v| !v.is_empty()), "{field} missing: {doc}");
        }
        let expiration = humantime::parse_rfc3339(doc["Expiration"].as_str().unwrap()).unwrap();
        let left = expiration.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(15 * 60),
            "handed-out credentials must outlive the SDKs' refresh window: {left:?}"
        );
        assert_no_node_secret(&reply.body);
    }

    assert_eq!(node.get("127.0.0.3", CREDS).await.body, "other");
    assert_eq!(node.get("127.0.0.3", &format!("{CREDS}other")).await.status, 200);
    let roles: Vec<String> = node.sts.assume_role_calls().iter().map(|c| c["RoleArn"].clone()).collect();
    assert!(roles.contains(&role_arn("app")), "{roles:?}");
    assert!(roles.contains(&other_account.to_string()), "{roles:?}");
}

#[tokio::test]
async fn pods_without_annotation_get_the_default_role() {
    let node = TestNode::start(&["--default-role=fallback"]).await;
    node.api.create_pod(pod("shop", "plain").ip("127.0.0.4").build());
    node.api.create_pod(pod("shop", "annotated").ip("127.0.0.5").role("app").build());
    assert_eq!(node.get("127.0.0.4", CREDS).await.body, "fallback");
    assert_eq!(node.get("127.0.0.5", CREDS).await.body, "app", "the annotation wins over the default");
    assert_eq!(node.get("127.0.0.4", &format!("{CREDS}fallback")).await.status, 200);
}

#[tokio::test]
async fn no_role_is_a_404_with_the_reason_and_never_the_nodes_credentials() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=300ms"]).await;
    node.api.create_pod(pod("shop", "plain").ip("127.0.0.6").build());
    node.api.create_pod(pod("shop", "bad").ip("127.0.0.7").role("arn:aws:s3:::bucket").build());
    iamlet_testkit::eventually(5, "pods indexed", async || node.metric("iamlet_pods_indexed").await == 2.0).await;

    let reply = node.get("127.0.0.6", CREDS).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("no role annotation"), "{}", reply.body);
    let reply = node.get("127.0.0.7", CREDS).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("not an IAM role ARN"), "{}", reply.body);
    let reply = node.get("127.0.0.99", CREDS).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("no pod with IP 127.0.0.99"), "{}", reply.body);

    // Whatever a pod tries, the node's credentials, user-data and identity never come back.
    let attempts = [
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/iam/security-credentials/node-role/",
        "/latest/meta-data/iam/info",
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/placement/../iam/security-credentials/node-role",
        "/latest/meta-data/placement/%2E%2E/iam/security-credentials/node-role",
        "/latest//meta-data/iam/security-credentials/node-role",
        "/2021-07-15/meta-data/iam/security-credentials/node-role",
        "/latest/dynamic/instance-identity/signature",
    ];
    for ip in ["127.0.0.6", "127.0.0.7", "127.0.0.99"] {
        for path in attempts {
            let reply = node.get(ip, path).await;
            assert!(reply.status == 404 || reply.status == 400, "{ip} {path}: {reply:?}");
            assert_no_node_secret(&reply.body);
        }
    }
    assert!(node.imds.relayed().is_empty(), "nothing was relayed upstream: {:?}", node.imds.relayed());
    assert!(node.sts.assume_role_calls().is_empty(), "denials never call STS");
}

#[tokio::test]
async fn the_requested_role_must_be_the_pods() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.8").role("app").build());
    let reply = node.get("127.0.0.8", &format!("{CREDS}admin")).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("role is app, not admin"), "{}", reply.body);
}

#[tokio::test]
async fn imdsv2_tokens_are_issued_and_bound_to_the_pods_ip() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.10").role("app").build());
    node.api.create_pod(pod("shop", "b").ip("127.0.0.11").role("app").build());
    let app = node.app();

    let reply =
        request("127.0.0.10", app, "PUT", "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", "120")])
            .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-aws-ec2-metadata-token-ttl-seconds"), Some("120"), "the TTL is echoed");
    let token_a = reply.body;

    let with = |t: &str| [("x-aws-ec2-metadata-token", t.to_string())];
    let get_with = async |from: &str, t: &str| {
        let headers = with(t);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(from, app, "GET", CREDS, &headers).await
    };
    assert_eq!(get_with("127.0.0.10", &token_a).await.status, 200);
    let stolen = get_with("127.0.0.11", &token_a).await;
    assert_eq!(stolen.status, 401, "a token is useless from another pod: {stolen:?}");
    assert_eq!(get_with("127.0.0.10", "forged-token").await.status, 401);
    assert_eq!(get_with("127.0.0.10", &"A".repeat(56)).await.status, 401);
    let token_b = token("127.0.0.11", app).await;
    assert_eq!(get_with("127.0.0.11", &token_b).await.status, 200);

    // Token requests are checked as IMDS checks them.
    for (ttl, expected) in
        [(None, 400), (Some("0"), 400), (Some("21601"), 400), (Some("abc"), 400), (Some("21600"), 200)]
    {
        let headers: Vec<(&str, &str)> = ttl.map(|t| ("x-aws-ec2-metadata-token-ttl-seconds", t)).into_iter().collect();
        assert_eq!(request("127.0.0.10", app, "PUT", "/latest/api/token", &headers).await.status, expected, "{ttl:?}");
    }
    let proxied = [("x-aws-ec2-metadata-token-ttl-seconds", "60"), ("x-forwarded-for", "10.1.2.3")];
    assert_eq!(request("127.0.0.10", app, "PUT", "/latest/api/token", &proxied).await.status, 403);
    assert_eq!(pod_client::get("127.0.0.10", app, "/latest/api/token").await.status, 405);
}

#[tokio::test]
async fn require_imdsv2_refuses_requests_without_a_token() {
    let node = TestNode::start(&["--require-imdsv2"]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.12").role("app").build());
    let reply = node.get("127.0.0.12", CREDS).await;
    assert_eq!(reply.status, 401);
    assert!(reply.body.contains("IMDSv2 is required"), "{}", reply.body);
    let token = token("127.0.0.12", node.app()).await;
    let reply = request("127.0.0.12", node.app(), "GET", CREDS, &[("x-aws-ec2-metadata-token", &token)]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "app"));
}

#[tokio::test]
async fn allow_listed_paths_are_proxied_with_the_agents_own_token_only() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.13").role("app").build());
    let pod_token = token("127.0.0.13", node.app()).await;
    let headers =
        [("x-aws-ec2-metadata-token", pod_token.as_str()), ("x-forwarded-for", "10.9.9.9"), ("x-custom", "pod")];
    let reply = request("127.0.0.13", node.app(), "GET", "/latest/meta-data/placement/region", &headers).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "us-east-1"));
    let reply = node.get("127.0.0.13", "/latest/dynamic/instance-identity/document").await;
    assert_eq!(reply.json()["region"], "us-east-1");

    let relayed = node.imds.relayed();
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    for seen in relayed {
        let header = |name: &str| seen.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-aws-ec2-metadata-token").as_deref(), Some("upstream-session-token"), "iamlet's own token");
        assert_eq!(header("x-forwarded-for"), None, "no pod header goes upstream");
        assert_eq!(header("x-custom"), None);
    }

    // Less than the default only when asked for explicitly.
    let only =
        TestNode::start(&["--allow-route-regexp=^/latest/meta-data/instance-type$", "--allow-route-regexp-only"]).await;
    only.api.create_pod(pod("shop", "a").ip("127.0.0.14").role("app").build());
    assert_eq!(only.get("127.0.0.14", "/latest/meta-data/instance-type").await.body, "m5.large");
    assert_eq!(only.get("127.0.0.14", "/latest/meta-data/instance-type/").await.body, "m5.large");
    assert_eq!(only.get("127.0.0.14", "/latest/meta-data/placement/region").await.status, 404);
    assert_eq!(only.get("127.0.0.14", CREDS).await.body, "app", "the credential routes are iamlet's whatever the list");
}

/// Paths as real clients send them, against a node metadata service that answers like the
/// real one (every entry with or without its trailing slash, under every version): repeated
/// slashes collapse before routing and go upstream collapsed; a leaf with a trailing slash is
/// answered; the Spot and rebalance notices are relayed by default.
#[tokio::test]
async fn paths_as_real_clients_send_them_are_answered_as_imds_answers_them() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "spot").ip("127.0.0.16").role("app").build());
    for version in ["latest", "2021-07-15"] {
        for (path, body) in [
            (format!("/{version}/meta-data/instance-type/"), "m5.large"),
            (format!("/{version}/meta-data/placement/region/"), "us-east-1"),
            (format!("/{version}/meta-data//placement//region"), "us-east-1"),
            (format!("/{version}/meta-data/placement"), "availability-zone\nregion\n"),
            (format!("/{version}/meta-data/spot/termination-time"), "2026-11-30T12:00:00Z"),
            (format!("/{version}/meta-data/spot/termination-time/"), "2026-11-30T12:00:00Z"),
            (format!("/{version}/meta-data/events/maintenance/scheduled"), "[]"),
        ] {
            let reply = node.get("127.0.0.16", &path).await;
            assert_eq!((reply.status, reply.body.as_str()), (200, body), "{path}");
        }
        let action = node.get("127.0.0.16", &format!("/{version}/meta-data/spot/instance-action")).await;
        assert_eq!(action.json()["action"], "terminate", "{version}");
        let rebalance =
            node.get("127.0.0.16", &format!("/{version}/meta-data/events/recommendations/rebalance/")).await;
        assert_eq!(rebalance.json()["noticeTime"], "2026-11-30T11:50:00Z", "{version}");

        // The pod's own credentials, through a joined-with-a-slash URL.
        let listing = node.get("127.0.0.16", &format!("/{version}/meta-data//iam/security-credentials/")).await;
        assert_eq!((listing.status, listing.body.as_str()), (200, "app"), "{version}");
        let doc = node.get("127.0.0.16", &format!("/{version}/meta-data/iam//security-credentials//app")).await;
        assert_eq!(doc.json()["Code"], "Success", "{version}");
    }
    let relayed: Vec<String> = node.imds.relayed().into_iter().map(|s| s.path).collect();
    assert!(relayed.contains(&"/latest/meta-data/placement/region".to_string()), "{relayed:?}");
    assert!(relayed.iter().all(|p| !p.contains("//")), "relayed as collapsed: {relayed:?}");
    assert!(relayed.iter().all(|p| !p.contains("security-credentials")), "{relayed:?}");

    // Still refused: dot segments and escapes, and what identifies the node, however spelled.
    for (path, status) in [
        ("/latest/meta-data/placement/../iam/security-credentials/node-role", 400),
        ("/latest/meta-data/placement/%72egion", 400),
        ("/latest/meta-data/%2f/iam/security-credentials/", 400),
        ("/latest//user-data/", 404),
        ("/latest/meta-data//iam//info/", 404),
        ("/2021-07-15//dynamic//instance-identity//pkcs7/", 404),
    ] {
        let reply = node.get("127.0.0.16", path).await;
        assert_eq!(reply.status, status, "{path}: {reply:?}");
        assert_no_node_secret(&reply.body);
    }
}

/// kube2iam's common allow-lists, given to iamlet as they are: what they admit comes on top of
/// the default list, so an SDK still finds its region; the credential routes stay the pod's and
/// the node's identity is never relayed.
#[tokio::test]
async fn a_kube2iam_allow_list_adds_to_the_default_and_never_reaches_the_node() {
    for (allow, tags) in [("/latest/*", 404), (".*", 200), ("", 404)] {
        let node = TestNode::start(&[&format!("--allow-route-regexp={allow}")]).await;
        node.api.create_pod(pod("shop", "web").ip("127.0.0.17").role("app").build());
        let region = node.get("127.0.0.17", "/latest/meta-data/placement/region").await;
        assert_eq!((region.status, region.body.as_str()), (200, "us-east-1"), "{allow:?}");
        let listing = node.get("127.0.0.17", CREDS).await;
        assert_eq!((listing.status, listing.body.as_str()), (200, "app"), "{allow:?}");
        let doc = node.get("127.0.0.17", &format!("{CREDS}app")).await;
        assert_eq!(doc.json()["Code"], "Success", "{allow:?}");
        for never in ["/latest/user-data", "/latest/meta-data/iam/info", "/latest/dynamic/instance-identity/pkcs7"] {
            let reply = node.get("127.0.0.17", never).await;
            assert_eq!(reply.status, 404, "{allow:?} {never}");
            assert_no_node_secret(&reply.body);
        }
        assert_eq!(node.get("127.0.0.17", "/latest/meta-data/tags/instance/Name").await.status, tags, "{allow:?}");
    }
}

#[tokio::test]
async fn admin_endpoints_live_only_on_the_admin_port() {
    let node = TestNode::start(&["--debug"]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.15").role("app").build());
    assert_eq!(node.get("127.0.0.15", &format!("{CREDS}app")).await.status, 200);
    // /healthz is the exception, served on both (kube2iam's chart probes the app port).
    for path in ["/metrics", "/readyz", "/debug/store"] {
        assert_eq!(node.get("127.0.0.15", path).await.status, 404, "{path} on the app port");
    }
    assert_eq!(node.admin_get("/healthz").await.status, 200);
    let metrics = node.admin_get("/metrics").await.body;
    assert!(metrics.contains("iamlet_http_requests_total{route=\"credentials\",code=\"200\"} 1"), "{metrics}");
    assert!(metrics.contains("iamlet_sts_assume_role_calls_total{result=\"success\"} 1"), "{metrics}");
    let store = node.admin_get("/debug/store").await;
    let doc = store.json();
    assert_eq!(doc["pods"][0]["name"], "a");
    assert_eq!(doc["credentials"][0]["session"], "shop.a");
    let body = store.body;
    let secret =
        node.get("127.0.0.15", &format!("{CREDS}app")).await.json()["SecretAccessKey"].as_str().unwrap().to_string();
    assert!(!body.contains(&secret), "the debug store never shows secrets");

    let plain = TestNode::start(&[]).await;
    assert_eq!(plain.admin_get("/debug/store").await.status, 404, "/debug/store needs --debug");
}

#[tokio::test]
async fn garbage_requests_get_errors_and_the_agent_keeps_serving() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.16").role("app").build());
    let oversized = format!("GET {CREDS} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "x".repeat(200_000));
    let garbage: [&[u8]; 5] = [
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n",
        b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        oversized.as_bytes(),
    ];
    for bytes in garbage {
        let mut stream = pod_client::connect("127.0.0.16", node.app()).await;
        let _ = stream.write_all(bytes).await; // the agent may close before reading it all
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    let reply = request("127.0.0.16", node.app(), "DELETE", CREDS, &[]).await;
    assert_eq!(reply.status, 405);
    assert_eq!(node.get("127.0.0.16", CREDS).await.body, "app", "still serving");
}

#[tokio::test]
async fn the_base_arn_and_default_role_can_be_discovered_from_the_nodes_metadata() {
    let node = TestNode::start(&["--auto-discover-base-arn"]).await;
    node.api.create_pod(pod("shop", "a").ip("127.0.0.17").role("app").build());
    assert_eq!(node.get("127.0.0.17", &format!("{CREDS}app")).await.status, 200);
    // The fake node's instance profile is arn:aws:iam::123456789012:instance-profile/nodes/node-profile.
    assert_eq!(node.sts.assume_role_calls()[0]["RoleArn"], role_arn("app"));

    let node = TestNode::start(&["--auto-discover-default-role"]).await;
    node.api.create_pod(pod("shop", "plain").ip("127.0.0.18").build());
    assert_eq!(node.get("127.0.0.18", CREDS).await.body, "node-role");
    let reply = node.get("127.0.0.18", &format!("{CREDS}node-role")).await;
    assert_eq!(reply.status, 200);
    assert_no_node_secret(&reply.body);
    assert_eq!(node.sts.assume_role_calls()[0]["RoleArn"], role_arn("node-role"), "assumed, not the node's own keys");
}

/// Every path and version prefix of a metadata service that holds the node's secrets, under
/// the default and the permissive allow-lists kube2iam and kiam installs use: no answer to a
/// pod ever holds a secret, and the credential routes are the pod's under every prefix.
#[tokio::test]
async fn no_allow_list_or_version_prefix_reaches_the_nodes_secrets() {
    let rests = [
        "meta-data/iam/security-credentials/",
        "meta-data/iam/security-credentials/node-role",
        "meta-data/iam/security-credentials/node-role/",
        "meta-data/iam/info",
        "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "user-data",
        "dynamic/instance-identity/pkcs7",
        "dynamic/instance-identity/signature",
        "dynamic/instance-identity/rsa2048",
        "dynamic/instance-identity/document",
        "meta-data/placement/region",
        "meta-data/tags/instance/Name",
    ];
    for allow in [None, Some(".*"), Some("/latest/.*"), Some("/latest/*")] {
        let flag = allow.map(|a| format!("--allow-route-regexp={a}"));
        let node = TestNode::start(&flag.iter().map(String::as_str).collect::<Vec<_>>()).await;
        node.api.create_pod(pod("shop", "web").ip("127.0.0.31").role("app").build());
        node.api.create_pod(pod("shop", "plain").ip("127.0.0.32").build());
        let v2 = token("127.0.0.31", node.app()).await;
        for version in ["latest", "2016-09-02", "2021-07-15", "1.0", "LATEST"] {
            for rest in rests {
                // As written, with a trailing slash, and with every slash doubled.
                let spellings = [
                    format!("/{version}/{rest}"),
                    format!("/{version}/{}/", rest.trim_end_matches('/')),
                    format!("/{version}//{}", rest.replace('/', "//")),
                ];
                for path in &spellings {
                    for (ip, headers) in [
                        ("127.0.0.31", vec![]),
                        ("127.0.0.31", vec![("x-aws-ec2-metadata-token", v2.as_str())]),
                        ("127.0.0.32", vec![]),
                    ] {
                        let reply = request(ip, node.app(), "GET", path, &headers).await;
                        assert_no_node_secret(&reply.body);
                        if rest.contains("node-role") {
                            assert_eq!(reply.status, 404, "{allow:?} {ip} {path}: {reply:?}");
                        }
                    }
                }
            }
            let listing = node.get("127.0.0.31", &format!("/{version}/meta-data/iam/security-credentials/")).await;
            // (The pod's own listing, under a real version; see below for none or two.)
            assert_eq!((listing.status, listing.body.as_str()), (200, "app"), "{allow:?} {version}");
            let doc = node.get("127.0.0.31", &format!("/{version}/meta-data/iam/security-credentials/app")).await;
            assert_eq!(doc.json()["Code"], "Success", "{allow:?} {version}");
        }
        // No version, or two: a path an allow-list like `.*` admits, which the node's service
        // (this one, at least) would answer with its secrets.
        for prefix in ["", "latest/latest/", "x/"] {
            for rest in rests {
                let path = format!("/{prefix}{rest}");
                let reply = request("127.0.0.31", node.app(), "GET", &path, &[]).await;
                assert_no_node_secret(&reply.body);
                // `/x/` stands where a version would: its credential listing is the pod's own.
                let own_listing = prefix == "x/" && rest == "meta-data/iam/security-credentials/";
                let harmless = ["placement", "document", "tags"].iter().any(|h| rest.contains(h));
                if !harmless && !own_listing {
                    assert_eq!(reply.status, 404, "{allow:?} {path}: {reply:?}");
                }
            }
        }
        let relayed: Vec<String> = node.imds.relayed().into_iter().map(|s| s.path).collect();
        for path in &relayed {
            let path_lower = path.trim_end_matches('/').to_ascii_lowercase();
            assert!(
                ["/dynamic/instance-identity/document", "/meta-data/placement/region", "/meta-data/tags/instance/name"]
                    .iter()
                    .any(|harmless| path_lower.ends_with(harmless)),
                "{allow:?} relayed {path}"
            );
        }
    }
}

#[tokio::test]
async fn the_default_allow_list_serves_the_load_balancer_controllers_vpc_lookup() {
    let node = TestNode::start(&[]).await;
    node.api.create_pod(pod("kube-system", "aws-load-balancer-controller").ip("127.0.0.33").role("app").build());
    let mac = node.get("127.0.0.33", "/latest/meta-data/mac").await;
    assert_eq!((mac.status, mac.body.as_str()), (200, "0e:49:61:0f:c3:11"));
    let vpc = node.get("127.0.0.33", &format!("/latest/meta-data/network/interfaces/macs/{}/vpc-id", mac.body)).await;
    assert_eq!((vpc.status, vpc.body.as_str()), (200, "vpc-0abc"));
    assert_eq!(node.get("127.0.0.33", "/latest/meta-data/tags/instance/Name").await.status, 404);
}

#[tokio::test]
async fn healthz_answers_probes_on_the_metadata_port_without_a_token() {
    // kube2iam's chart probes /healthz on the app port; with IMDSv2 required, a probe still
    // carries no token, and nothing else is served without one.
    let node = TestNode::start(&["--require-imdsv2"]).await;
    node.api.create_pod(pod("shop", "web").ip("127.0.0.90").role("app").build());
    for from in ["127.0.0.1", "127.0.0.90"] {
        let reply = node.get(from, "/healthz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"), "from {from}");
    }
    assert_eq!(node.get("127.0.0.90", "/latest/meta-data/iam/security-credentials/").await.status, 401);
    let post = pod_client::request("127.0.0.90", node.app(), "POST", "/healthz", &[]).await;
    assert_eq!(post.status, 405);
}
