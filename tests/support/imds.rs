//! A stand-in for the node's real metadata service, in IMDSv2-required mode (tokens
//! mandatory), holding node secrets that must never reach a pod.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// Strings that only the node's own metadata holds: a pod must never see any of them.
pub const NODE_SECRETS: [&str; 3] = ["NODE-ACCESS-KEY", "NODE-SECRET-KEY", "NODE-USER-DATA"];
pub const NODE_ROLE: &str = "node-role";
const UPSTREAM_TOKEN: &str = "upstream-session-token";

/// A request the fake IMDS received: method, path and headers.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

pub struct FakeImds {
    pub addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: super::server::ServerTask,
}

impl FakeImds {
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Starts on `listener` (one bound inside a network namespace, say).
    pub fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recording = seen.clone();
        let task = super::server::serve(listener, move |request| {
            let seen = recording.clone();
            async move { answer(&seen, request) }
        });
        Self { addr, seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(seen: &Mutex<Vec<Seen>>, request: Request<Incoming>) -> Response<Full<Bytes>> {
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
    if request.headers().get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) != Some(UPSTREAM_TOKEN) {
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    match path.as_str() {
        "/latest/meta-data/placement/region" => reply(StatusCode::OK, "us-east-1"),
        "/latest/meta-data/placement/availability-zone" => reply(StatusCode::OK, "us-east-1a"),
        "/latest/meta-data/instance-type" => reply(StatusCode::OK, "m5.large"),
        "/latest/dynamic/instance-identity/document" => reply(
            StatusCode::OK,
            r#"{"region": "us-east-1", "availabilityZone": "us-east-1a", "accountId": "123456789012"}"#,
        ),
        "/latest/meta-data/iam/info" => reply(
            StatusCode::OK,
            r#"{"Code": "Success", "InstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/nodes/node-profile", "InstanceProfileId": "AIPAEXAMPLE"}"#,
        ),
        "/latest/meta-data/iam/security-credentials/" | "/latest/meta-data/iam/security-credentials" => {
            reply(StatusCode::OK, NODE_ROLE)
        }
        "/latest/meta-data/iam/security-credentials/node-role" => reply(
            StatusCode::OK,
            r#"{"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "NODE-ACCESS-KEY", "SecretAccessKey": "NODE-SECRET-KEY", "Token": "NODE-TOKEN", "Expiration": "2099-01-01T00:00:00Z"}"#,
        ),
        "/latest/user-data" => reply(StatusCode::OK, "#!/bin/sh\nexport DB_PASSWORD=NODE-USER-DATA"),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}
