//! The tests' fake Kubernetes API server as a program, for the demo and manual runs.
//!
//! `fake_apiserver --listen 10.254.0.1:6443` serves pods, namespaces and ServiceAccounts
//! with list, watch, field selectors and resourceVersions; create them with `POST` to their
//! collection (`/api/v1/namespaces/<ns>/pods`, `.../serviceaccounts`) and delete them with
//! `DELETE .../<name>`, as kubectl does.

use std::time::Duration;

use iamlet_testkit::apiserver;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => addr,
        _ => {
            eprintln!("usage: fake_apiserver --listen HOST:PORT");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap_or_else(|e| {
        eprintln!("fake_apiserver: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    let server = apiserver::FakeApiServer::start_on(listener, None, Duration::from_secs(10));
    eprintln!("fake_apiserver: serving {}", server.url);
    let _ = tokio::signal::ctrl_c().await;
}
