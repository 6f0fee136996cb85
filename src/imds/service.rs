//! One metadata request, from the caller's IP to the answer IMDS would give.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::ImdsSettings;
use super::audit::CredentialAudit;
use super::render;
use super::routes::{AllowList, Route, classify, normalize};
use super::token::{TokenIssuer, parse_ttl};
use super::upstream::UpstreamImds;
use crate::cluster::{PodEvents, PodStore, Reason};
use crate::credentials::{CredentialCache, CredentialError};
use crate::http::{Body, text};
use crate::metrics::{InFlight, Metrics, RequestLabels, RouteLabels};
use crate::pod::PodIdentity;
use crate::ports::{Ports, Verdict};
use crate::resolve::{Resolved, Resolver, Unresolved};

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Everything a metadata request needs.
pub struct ImdsService {
    pods: Arc<PodStore>,
    resolver: Arc<Resolver>,
    credentials: Arc<CredentialCache>,
    tokens: TokenIssuer,
    upstream: Arc<UpstreamImds>,
    allow_route: AllowList,
    require_imdsv2: bool,
    /// How long a request from an unknown IP waits for the watch.
    pod_wait: Duration,
    node: String,
    metrics: Arc<Metrics>,
    /// Events on pods that get no credentials (`--pod-events`).
    events: Option<PodEvents>,
    /// Which port each pod address belongs to (`--bind-pod-ports`; off until decided).
    ports: Ports,
    /// `--credential-audit-log`.
    audit: Option<CredentialAudit>,
}

impl ImdsService {
    /// The service for `node`'s pods, as the metadata API flags say.
    pub fn new(
        settings: &ImdsSettings,
        node: &str,
        pods: Arc<PodStore>,
        resolver: Arc<Resolver>,
        credentials: Arc<CredentialCache>,
        upstream: Arc<UpstreamImds>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pods,
            resolver,
            credentials,
            tokens: TokenIssuer::new(),
            upstream,
            allow_route: settings.allow_route_regexp.clone(),
            require_imdsv2: settings.require_imdsv2,
            pod_wait: settings.backoff_max_elapsed_time,
            node: node.to_string(),
            metrics,
            events: None,
            ports: Ports::default(),
            audit: settings.credential_audit_log.then(CredentialAudit::new),
        }
    }

    /// Issues and checks tokens with `tokens` (the node's token key, which outlives the
    /// process) rather than a key of its own.
    pub fn with_tokens(self, tokens: TokenIssuer) -> Self {
        Self { tokens, ..self }
    }

    /// Records why pods get no credentials as Events on them (`--pod-events`).
    pub fn with_events(self, events: Option<PodEvents>) -> Self {
        Self { events, ..self }
    }

    /// Checks each request's pod against the pod port binding: a pod whose port is unknown,
    /// or whose address the CNI gave another pod, is refused.
    pub fn with_ports(self, ports: Ports) -> Self {
        Self { ports, ..self }
    }

    /// The node's metadata service this one relays to.
    pub fn upstream(&self) -> &Arc<UpstreamImds> {
        &self.upstream
    }

    /// Answers `request` from `peer`, recording metrics. Never panics on input.
    pub async fn handle<B>(&self, peer: IpAddr, request: Request<B>) -> Response<Body> {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.metrics.requests_in_flight);
        let peer = peer.to_canonical();
        let (method, headers) = (request.method(), request.headers());
        // Every rule, and the relay, sees the path as IMDS reads it (repeated slashes collapsed).
        let path = normalize(request.uri().path());
        let route = path.as_deref().map_or(Route::Malformed, |path| classify(path, &self.allow_route));
        let path = path.as_deref().unwrap_or_default();
        let mut response = self.respond(peer, method, path, route, headers).await;
        response.headers_mut().insert(http::header::SERVER, http::HeaderValue::from_static("EC2ws"));
        let label = route.label();
        self.metrics.requests.get_or_create(&RequestLabels { route: label, code: response.status().as_u16() }).inc();
        self.metrics
            .request_duration
            .get_or_create(&RouteLabels { route: label })
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn respond(
        &self,
        peer: IpAddr,
        method: &Method,
        path: &str,
        route: Route<'_>,
        headers: &HeaderMap,
    ) -> Response<Body> {
        if route == Route::Token {
            return self.issue_token(peer, method, headers);
        }
        if route == Route::Health {
            // A kubelet probe carries no token, whatever --require-imdsv2 says.
            return match *method {
                Method::GET | Method::HEAD => text(StatusCode::OK, "ok\n"),
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            };
        }
        if let Some(refusal) = self.check_token(peer, headers) {
            return refusal;
        }
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match route {
            Route::RoleName => match self.resolve(peer).await {
                Ok((_, resolved)) => text(StatusCode::OK, resolved.assignment.role.name().to_string()),
                Err(refusal) => refusal,
            },
            Route::Credentials(name) => self.credentials(peer, name).await,
            Route::Proxy => self.proxy(path).await,
            Route::NotAllowed => text(StatusCode::NOT_FOUND, "not found: this path is not served to pods\n"),
            Route::Sensitive => text(
                StatusCode::NOT_FOUND,
                "not found: this path identifies or empowers the node and is never served to pods\n",
            ),
            Route::Malformed => text(StatusCode::BAD_REQUEST, "bad request: path is not canonical\n"),
            // Answered before the token check above; routed here too so the match is total.
            Route::Token => self.issue_token(peer, method, headers),
            Route::Health => text(StatusCode::OK, "ok\n"),
        }
    }

    /// `PUT /latest/api/token`, as IMDS answers it.
    fn issue_token(&self, peer: IpAddr, method: &Method, headers: &HeaderMap) -> Response<Body> {
        if method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        // IMDS refuses token requests that went through a proxy, so a pod-side proxy (or an
        // SSRF through one) cannot obtain a token.
        if headers.contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "forbidden: X-Forwarded-For is not accepted\n");
        }
        let Some(ttl) = parse_ttl(headers.get(TTL_HEADER).and_then(|v| v.to_str().ok())) else {
            return text(
                StatusCode::BAD_REQUEST,
                "bad request: X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600\n",
            );
        };
        let mut response = text(StatusCode::OK, self.tokens.issue(peer, ttl, SystemTime::now()));
        response.headers_mut().insert(TTL_HEADER, ttl.as_secs().into());
        response
    }

    /// A present token must be valid for this IP; an absent one is fine unless IMDSv2 is required.
    fn check_token(&self, peer: IpAddr, headers: &HeaderMap) -> Option<Response<Body>> {
        match headers.get(TOKEN_HEADER) {
            Some(token) => {
                let verdict = token
                    .to_str()
                    .map_err(|_| super::token::TokenError::Malformed)
                    .and_then(|token| self.tokens.verify(token, peer, SystemTime::now()));
                verdict.err().map(|error| text(StatusCode::UNAUTHORIZED, format!("unauthorized: {error}\n")))
            }
            None if self.require_imdsv2 => {
                Some(text(StatusCode::UNAUTHORIZED, "unauthorized: IMDSv2 is required; PUT /latest/api/token first\n"))
            }
            None => None,
        }
    }

    /// The pod behind `peer`, its role and credential key, or the 404 that says why not.
    ///
    /// A request waits at most once, `--backoff-max-elapsed-time` in all, for what it depends
    /// on: the watch to deliver its pod, then the caches the answer needs (just after start):
    /// SDKs give up on the metadata service after about a second.
    async fn resolve(&self, peer: IpAddr) -> Result<(Arc<PodIdentity>, Resolved), Response<Body>> {
        let deadline = tokio::time::Instant::now() + self.pod_wait;
        let Some(pod) = self.pods.wait_for(&peer, self.pod_wait).await else {
            tracing::info!(%peer, node = %self.node, "request from an IP with no known pod");
            return Err(text(
                StatusCode::NOT_FOUND,
                format!("not found: no pod with IP {peer} is known on node {}\n", self.node),
            ));
        };
        if let Verdict::Unbound(why) = self.ports.verdict(&pod, &peer) {
            // Its Warning Event comes from the binding's own report, whether or not it asks.
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, %peer, %why, "refused: the pod's port is not bound");
            return Err(text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n")));
        }
        let mut resolved = self.resolver.resolve(&pod);
        if matches!(resolved, Err(Unresolved::NotSynced { .. })) {
            // Just started: the answer waits for the caches it depends on, in what is left of
            // the same wait.
            let _ = tokio::time::timeout_at(deadline, self.resolver.synced()).await;
            resolved = self.resolver.resolve(&pod);
        }
        match resolved {
            Ok(resolved) => Ok((pod, resolved)),
            Err(not_yet @ Unresolved::NotSynced { .. }) => {
                tracing::info!(namespace = %pod.namespace, pod = %pod.name, reason = %not_yet, "answer deferred");
                Err(text(StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {not_yet}; retry\n")))
            }
            Err(Unresolved::Denied(denial)) => {
                tracing::info!(
                    namespace = %pod.namespace, pod = %pod.name, role = pod.role_annotation.as_deref().unwrap_or_default(),
                    service_account = %pod.service_account, reason = %denial, "role denied"
                );
                if let Some(events) = &self.events {
                    events.report(&pod, Reason::RoleDenied, denial.to_string());
                }
                Err(text(StatusCode::NOT_FOUND, format!("not found: {denial}\n")))
            }
        }
    }

    async fn credentials(&self, peer: IpAddr, requested: &str) -> Response<Body> {
        // A throttled AssumeRole is tried again only within the request's own wait.
        let retry_until = tokio::time::Instant::now() + self.pod_wait;
        let (pod, Resolved { assignment, key }) = match self.resolve(peer).await {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        if requested != assignment.role.name() {
            return text(
                StatusCode::NOT_FOUND,
                format!("not found: this pod's role is {}, not {requested}\n", assignment.role.name()),
            );
        }
        // Bounded by --sts-timeout: behind a queue of prefetches (a restart on a busy node) the
        // answer may take a while, and SDKs give up long before; the fetch goes on for the next try.
        let wait = self.credentials.sts_timeout();
        let fetched = tokio::time::timeout(wait, self.credentials.get_until(&key, retry_until)).await;
        let fetched =
            fetched.unwrap_or_else(|_| Err(CredentialError::Busy { role: assignment.role.to_string(), waited: wait }));
        match fetched {
            Ok(issued) => {
                if let Some(audit) = &self.audit {
                    audit.handed(&pod, &key, &issued.credentials.access_key_id).await;
                }
                text(StatusCode::OK, issued.rendered(render::credentials))
            }
            Err(error) => {
                tracing::warn!(namespace = %pod.namespace, pod = %pod.name, role = %assignment.role, %error, "no credentials");
                if let Some(events) = &self.events {
                    events.report(&pod, Reason::AssumeRoleFailed, error.to_string());
                }
                text(StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {error}\n"))
            }
        }
    }

    /// Relays an allow-listed path. Only the path goes upstream: no pod header is forwarded.
    async fn proxy(&self, path: &str) -> Response<Body> {
        match self.upstream.get(path).await {
            Ok(answer) => text(answer.status, answer.body),
            Err(error) => {
                tracing::warn!(%path, %error, "metadata service unavailable");
                text(StatusCode::BAD_GATEWAY, format!("bad gateway: {error}\n"))
            }
        }
    }
}
