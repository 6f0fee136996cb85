//! The admin port: liveness, readiness, metrics and (with `--debug`) the store's content.
//!
//! Kept off the app port, which every pod reaches through 169.254.169.254: in kube2iam,
//! `/metrics` and `/debug/store` were one request away for any pod.

use std::sync::Arc;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode, header};
use serde_json::json;
use tokio::sync::watch;

use crate::cluster::{NamespaceStore, PodStore, ServiceAccountStore};
use crate::credentials::CredentialCache;
use crate::http::{Body, text};
use crate::metrics::Metrics;

/// The admin port's settings.
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// `--metrics-port`; `None` when it equals `--app-port` (kube2iam's chart default): the
    /// admin endpoints are then not served at all, since every pod reaches the app port.
    pub metrics_port: Option<u16>,
    /// Serve `/debug/store`.
    pub debug: bool,
}

impl AdminSettings {
    /// Warns at startup when there is no admin port: `--metrics-port` equal to `--app-port`
    /// (kube2iam's chart default), which every pod reaches.
    pub fn announce(&self, app_port: u16) {
        if self.metrics_port.is_none() {
            tracing::warn!(
                app_port,
                "--metrics-port equals --app-port (kube2iam's default): /metrics, /readyz and /debug/store are not \
                 served, since every pod reaches --app-port; /healthz is; give --metrics-port a port of its own \
                 (iamlet's default is 8182) to serve them"
            );
        }
    }
}

/// One condition of readiness: what `/readyz` says while it does not hold, and the handle
/// that says whether it holds (and wakes whoever waits when that changes). The component the
/// condition is about keeps the other end: a store's [`crate::cluster::Synced`], the rule
/// keeper's state, the pod watch's health.
pub struct Condition {
    /// What is awaited, as `/readyz` lists it ("pod cache not synced").
    pub unmet: &'static str,
    holds: Box<dyn Fn() -> bool + Send + Sync>,
    /// Resolves once the condition holds; never, once its component is gone.
    wait: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

impl Condition {
    /// The condition that `holds` says of the value behind `handle`.
    pub fn new<T: Send + Sync + 'static>(
        unmet: &'static str,
        handle: watch::Receiver<T>,
        holds: fn(&T) -> bool,
    ) -> Self {
        let current = handle.clone();
        Self {
            unmet,
            holds: Box::new(move || holds(&current.borrow())),
            wait: Box::new(move || {
                let mut handle = handle.clone();
                Box::pin(async move {
                    if handle.wait_for(holds).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                })
            }),
        }
    }

    /// A store's "synced" signal as a condition.
    pub fn synced(unmet: &'static str, synced: &crate::cluster::Synced) -> Self {
        Self::new(unmet, synced.subscribe(), |synced| *synced)
    }

    fn holds(&self) -> bool {
        (self.holds)()
    }
}

/// What the agent needs before it may serve: the caches synced, the pod watch current, and
/// (with `--iptables`) its rules in place. Shared by `/readyz` and the startup taint, which
/// is removed only once the node is protected.
#[derive(Default)]
pub struct Readiness {
    conditions: Vec<Condition>,
}

impl Readiness {
    /// Adds a condition.
    pub fn require(&mut self, condition: Condition) {
        self.conditions.push(condition);
    }

    /// The conditions not met yet; empty when ready.
    pub fn waiting(&self) -> Vec<&'static str> {
        self.conditions.iter().filter(|c| !c.holds()).map(|c| c.unmet).collect()
    }

    /// Resolves once every condition holds at the same time, woken by their changes.
    pub async fn ready(&self) {
        loop {
            for condition in &self.conditions {
                (condition.wait)().await;
            }
            if self.waiting().is_empty() {
                return;
            }
        }
    }
}

pub struct AdminService {
    pub pods: Arc<PodStore>,
    pub namespaces: Option<Arc<NamespaceStore>>,
    pub service_accounts: Option<Arc<ServiceAccountStore>>,
    pub credentials: Arc<CredentialCache>,
    pub metrics: Arc<Metrics>,
    pub debug: bool,
    pub readiness: Arc<Readiness>,
}

impl AdminService {
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body> {
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.ready(),
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics.encode());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                response
            }
            "/debug/store" if self.debug => self.store(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn ready(&self) -> Response<Body> {
        let waiting = self.readiness.waiting();
        if waiting.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", waiting.join(", ")))
        }
    }

    /// The index, the namespace rules, the ServiceAccounts' roles and the cached keys: never a
    /// secret.
    fn store(&self) -> Response<Body> {
        let mut pods: Vec<_> = self.pods.read(|index| {
            index
                .pods()
                .map(|p| {
                    json!({"namespace": p.namespace, "name": p.name, "uid": p.uid, "ips": p.ips,
                           "role": p.role_annotation, "service_account": p.service_account, "running": p.running, "terminating": p.terminating,
                           "stopped": p.stopped})
                })
                .collect()
        });
        pods.sort_by_key(|p| (p["namespace"].to_string(), p["name"].to_string()));
        let namespaces: Vec<_> = self
            .namespaces
            .iter()
            .flat_map(|store| store.snapshot())
            .map(|(name, rule)| match rule.as_ref() {
                Ok(allowed) => {
                    json!({"namespace": name, "allowed": allowed.entries.iter().map(|e| &e.source).collect::<Vec<_>>()})
                }
                Err(error) => json!({"namespace": name, "error": error.to_string()}),
            })
            .collect();
        let service_accounts: Vec<_> = self
            .service_accounts
            .iter()
            .flat_map(|store| store.snapshot())
            .map(|(name, role)| json!({"service_account": name, "annotation": role.annotation, "role": role.value}))
            .collect();
        let credentials: Vec<_> = self
            .credentials
            .snapshot()
            .into_iter()
            .map(|(key, expiration, refresh_at)| {
                let tags: serde_json::Map<String, serde_json::Value> =
                    key.tags.iter().flat_map(|tags| tags.iter()).map(|t| (t.key.to_string(), json!(t.value))).collect();
                json!({"role": key.role.as_str(), "session": key.session_name.as_ref(), "scope": key.scope.as_str(),
                       "external_id": key.external_id.is_some(), "tags": tags,
                       "source_identity": key.source_identity.as_deref(),
                       "expiration": humantime::format_rfc3339_seconds(expiration).to_string(),
                       "refresh_at": humantime::format_rfc3339_seconds(refresh_at).to_string()})
            })
            .collect();
        let body = json!({"pods": pods, "namespaces": namespaces, "service_accounts": service_accounts,
                          "credentials": credentials});
        let mut response = text(StatusCode::OK, serde_json::to_vec_pretty(&body).unwrap_or_default());
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        response
    }
}
