//! A recording proxy in front of moto: counts AssumeRole calls, keeps their parameters
//! (ExternalId, RoleSessionName, DurationSeconds, Tags.member.N.*), who signed each one, how
//! it ended and what it issued, and can make STS fail or slow on demand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::moto::moto;

/// One STS request's form parameters, plus [`SIGNED_BY`], [`AT_MS`], [`OUTCOME`] and, once
/// answered, [`ISSUED`].
pub type Call = BTreeMap<String, String>;

/// The access key ID that signed a call (SigV4's `Credential=` in `Authorization`).
pub const SIGNED_BY: &str = "_SignedBy";
/// The access key ID an AssumeRole call issued, when it succeeded.
pub const ISSUED: &str = "_Issued";
/// How a call ended: STS's HTTP status, [`ABANDONED`] while it has not (the caller gave up
/// and closed the connection first), or `503 (injected)`.
pub const OUTCOME: &str = "_Outcome";
/// When the call arrived: milliseconds since the Unix epoch.
pub const AT_MS: &str = "_AtMs";
/// A call's [`OUTCOME`] until STS answers it.
pub const ABANDONED: &str = "abandoned by the caller";

/// An answer the proxy gives instead of STS's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// `503 ServiceUnavailable`, as an outage.
    Outage,
    /// `400 Throttling: Rate exceeded`, as STS throttles an account.
    Throttling,
    /// `403 AccessDenied`, as a trust policy that does not let iamlet in.
    AccessDenied,
}

impl Injected {
    fn answer(self) -> (StatusCode, &'static str, &'static str, &'static str) {
        match self {
            Injected::Outage => (StatusCode::SERVICE_UNAVAILABLE, "Receiver", "ServiceUnavailable", "injected outage"),
            Injected::Throttling => (StatusCode::BAD_REQUEST, "Sender", "Throttling", "Rate exceeded"),
            Injected::AccessDenied => (
                StatusCode::FORBIDDEN,
                "Sender",
                "AccessDenied",
                "User: arn:aws:sts::123456789012:assumed-role/node/i-0 is not authorized to perform: sts:AssumeRole",
            ),
        }
    }
}

#[derive(Default)]
struct State {
    calls: Mutex<Vec<Call>>,
    injected: Mutex<Option<Injected>>,
    delay_ms: AtomicU64,
    /// Roles whose sessions STS grants for this long only, whatever was asked.
    short_sessions: Mutex<BTreeMap<String, Duration>>,
}

pub struct StsProxy {
    pub url: String,
    state: Arc<State>,
    _task: crate::server::ServerTask,
}

impl StsProxy {
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Starts on `listener` (one bound inside a network namespace, say).
    pub fn start_on(listener: TcpListener) -> Self {
        let upstream = moto().url.clone();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let serving = state.clone();
        let task = crate::server::serve(listener, move |request| {
            let (state, client, upstream) = (serving.clone(), client.clone(), upstream.clone());
            async move { forward(&state, &client, &upstream, request).await }
        });
        Self { url, state, _task: task }
    }

    /// The AssumeRole calls seen so far.
    pub fn assume_role_calls(&self) -> Vec<Call> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.get("Action").map(String::as_str) == Some("AssumeRole"))
            .cloned()
            .collect()
    }

    /// Makes every STS call fail with 503 (as an outage does) until unset.
    pub fn set_failing(&self, failing: bool) {
        self.inject(failing.then_some(Injected::Outage));
    }

    /// Answers every STS call with `answer` instead of moto's, or again with moto's.
    pub fn inject(&self, answer: Option<Injected>) {
        *self.state.injected.lock().unwrap() = answer;
    }

    /// Makes STS grant `role`'s sessions for `lifetime` only (as a role whose maximum session
    /// is short does), or, with `None`, for what is asked again.
    pub fn set_session_lifetime(&self, role: &str, lifetime: Option<Duration>) {
        let mut short = self.state.short_sessions.lock().unwrap();
        match lifetime {
            Some(lifetime) => short.insert(role.to_string(), lifetime),
            None => short.remove(role),
        };
    }

    /// Delays every STS answer.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

async fn forward(
    state: &State,
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &str,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut form: Call = url_form(&body);
    let authorization = parts.headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Some(key) = authorization.and_then(signing_key) {
        form.insert(SIGNED_BY.into(), key.to_string());
    }
    form.insert(OUTCOME.into(), ABANDONED.into());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    form.insert(AT_MS.into(), now.as_millis().to_string());
    let index = {
        let mut calls = state.calls.lock().unwrap();
        calls.push(form);
        calls.len() - 1
    };
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let injected = *state.injected.lock().unwrap();
    if let Some(injected) = injected {
        let (status, kind, code, message) = injected.answer();
        state.calls.lock().unwrap()[index].insert(OUTCOME.into(), format!("{} (injected)", status.as_u16()));
        // As STS's query protocol answers errors (`Throttling: Rate exceeded` is a 400).
        let xml = format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type>\
             <Code>{code}</Code><Message>{message}</Message></Error><RequestId>test</RequestId></ErrorResponse>"
        );
        return Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/xml")
            .body(Full::new(Bytes::from(xml)))
            .unwrap();
    }
    let uri = format!("{upstream}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut forwarded = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            forwarded = forwarded.header(name, value);
        }
    }
    let response = client.request(forwarded.body(Full::new(body)).unwrap()).await.expect("moto answers");
    let (mut parts, body) = response.into_parts();
    let mut body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    state.calls.lock().unwrap()[index].insert(OUTCOME.into(), parts.status.as_u16().to_string());
    let role = state.calls.lock().unwrap()[index].get("RoleArn").cloned().unwrap_or_default();
    let lifetime = state.short_sessions.lock().unwrap().get(&role).copied();
    let text = String::from_utf8_lossy(&body).into_owned();
    if let (Some(lifetime), Some(expiration)) = (lifetime, element(&text, "Expiration")) {
        let shortened = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + lifetime).to_string();
        body = Bytes::from(text.replace(expiration, &shortened));
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    if let Some(issued) = element(&text, "AccessKeyId") {
        state.calls.lock().unwrap()[index].insert(ISSUED.into(), issued.to_string());
    }
    Response::from_parts(parts, Full::new(body))
}

/// The access key ID of a SigV4 `Authorization` header.
fn signing_key(authorization: &str) -> Option<&str> {
    let credential = authorization.split("Credential=").nth(1)?;
    credential.split('/').next()
}

/// The text of the first `<name>` element of an XML answer.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(&xml[start..end])
}

fn url_form(body: &[u8]) -> Call {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (crate::server::percent_decode(k), crate::server::percent_decode(v)))
        .collect()
}
