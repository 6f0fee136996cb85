//! A stand-in for the node's real metadata service, holding node secrets that must never
//! reach a pod: IMDSv2-required (tokens mandatory, the EKS default) or, as on nodes left with
//! `HttpTokens=optional`, answering IMDSv1 too.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// Strings that only the node's own metadata holds: a pod must never see any of them.
pub const NODE_SECRETS: [&str; 9] = [
    "NODE-ACCESS-KEY",
    "NODE-SECRET-KEY",
    "NODE-SESSION-TOKEN",
    "NODE-USER-DATA",
    "NODE-IDENTITY-KEY",
    "NODE-PKCS7",
    "NODE-SIGNATURE",
    "NODE-RSA2048",
    "NODE-PROFILE-ID",
];
pub const NODE_ROLE: &str = "node-role";
const UPSTREAM_TOKEN: &str = "upstream-session-token";

/// A request the fake IMDS received: method, path and headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Whether requests without a token are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    Required,
    Optional,
}

pub struct FakeImds {
    pub addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: crate::server::ServerTask,
}

impl FakeImds {
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Starts on `listener` (one bound inside a network namespace, say), tokens required.
    pub fn start_on(listener: TcpListener) -> Self {
        Self::start_with(listener, Tokens::Required)
    }

    pub fn start_with(listener: TcpListener, tokens: Tokens) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recording = seen.clone();
        let task = crate::server::serve(listener, move |request| {
            let seen = recording.clone();
            async move { answer(&seen, tokens, request) }
        });
        Self { addr, seen, _task: task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// What the agent relayed on pods' behalf: everything but its token requests and its own
    /// tokenless startup check of whether IMDSv1 is on.
    pub fn relayed(&self) -> Vec<Seen> {
        let own_probe = |s: &Seen| s.path == "/latest/meta-data/" && !s.headers.iter().any(|(k, _)| k == TOKEN_HEADER);
        self.seen().into_iter().filter(|s| s.path != "/latest/api/token" && !own_probe(s)).collect()
    }
}

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

fn answer(seen: &Mutex<Vec<Seen>>, tokens: Tokens, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    let headers =
        request.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect();
    seen.lock().unwrap().push(Seen { method: request.method().to_string(), path: path.clone(), headers });
    let reply = |status: StatusCode, body: &str| {
        Response::builder().status(status).body(Full::new(Bytes::from(body.to_string()))).unwrap()
    };
    if request.method() == http::Method::PUT && path == "/latest/api/token" {
        return reply(StatusCode::OK, UPSTREAM_TOKEN);
    }
    let token = request.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    let authorised = match (token, tokens) {
        (Some(token), _) => token == UPSTREAM_TOKEN,
        (None, Tokens::Optional) => true,
        (None, Tokens::Required) => false,
    };
    if !authorised {
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    // Like IMDS, the same tree under every version (`latest`, dated ones, `1.0`), and every
    // entry, leaf or listing, answered with or without a trailing slash. Worse than IMDS, to
    // catch what a relay must never pass: without a version too.
    let unversioned = ["/meta-data", "/user-data", "/dynamic", "/api"].iter().any(|top| path.starts_with(top));
    let versioned = match unversioned {
        true => Some(format!("/latest{path}")),
        false => path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(_, rest)| format!("/latest/{rest}")),
    };
    let versioned = versioned.as_deref().unwrap_or(&path);
    match versioned.strip_suffix('/').unwrap_or(versioned) {
        "/latest/meta-data" => {
            reply(StatusCode::OK, "ami-id\nevents/\niam/\ninstance-id\ninstance-type\nplacement/\nspot/\n")
        }
        "/latest/meta-data/placement" => reply(StatusCode::OK, "availability-zone\nregion\n"),
        "/latest/meta-data/spot/instance-action" => {
            reply(StatusCode::OK, r#"{"action": "terminate", "time": "2026-11-30T12:00:00Z"}"#)
        }
        "/latest/meta-data/spot/termination-time" => reply(StatusCode::OK, "2026-11-30T12:00:00Z"),
        "/latest/meta-data/events/recommendations/rebalance" => {
            reply(StatusCode::OK, r#"{"noticeTime": "2026-11-30T11:50:00Z"}"#)
        }
        "/latest/meta-data/events/maintenance/scheduled" => reply(StatusCode::OK, "[]"),
        "/latest/meta-data/placement/region" => reply(StatusCode::OK, "us-east-1"),
        "/latest/meta-data/placement/availability-zone" => reply(StatusCode::OK, "us-east-1a"),
        "/latest/meta-data/instance-type" => reply(StatusCode::OK, "m5.large"),
        "/latest/dynamic/instance-identity/document" => reply(
            StatusCode::OK,
            r#"{"region": "us-east-1", "availabilityZone": "us-east-1a", "accountId": "123456789012"}"#,
        ),
        "/latest/meta-data/iam/info" => reply(
            StatusCode::OK,
            r#"{"Code": "Success", "InstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/nodes/node-profile", "InstanceProfileId": "NODE-PROFILE-ID"}"#,
        ),
        "/latest/meta-data/iam/security-credentials" => reply(StatusCode::OK, NODE_ROLE),
        "/latest/meta-data/iam/security-credentials/node-role" => reply(
            StatusCode::OK,
            r#"{"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "NODE-ACCESS-KEY", "SecretAccessKey": "NODE-SECRET-KEY", "Token": "NODE-SESSION-TOKEN", "Expiration": "2099-01-01T00:00:00Z"}"#,
        ),
        "/latest/user-data" => reply(StatusCode::OK, "#!/bin/sh\nexport DB_PASSWORD=NODE-USER-DATA"),
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance" => reply(
            StatusCode::OK,
            r#"{"Code": "Success", "AccessKeyId": "NODE-IDENTITY-KEY", "SecretAccessKey": "NODE-IDENTITY-KEY"}"#,
        ),
        "/latest/dynamic/instance-identity/pkcs7" => reply(StatusCode::OK, "NODE-PKCS7"),
        "/latest/dynamic/instance-identity/signature" => reply(StatusCode::OK, "NODE-SIGNATURE"),
        "/latest/dynamic/instance-identity/rsa2048" => reply(StatusCode::OK, "NODE-RSA2048"),
        "/latest/meta-data/mac" => reply(StatusCode::OK, "0e:49:61:0f:c3:11"),
        "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-id" => reply(StatusCode::OK, "vpc-0abc"),
        "/latest/meta-data/tags/instance/Name" => reply(StatusCode::OK, "node-a"),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}
