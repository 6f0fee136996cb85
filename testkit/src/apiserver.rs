//! A fake Kubernetes API server, faithful where iamlet depends on it.
//!
//! No real API server can run here, so this one implements the parts of the protocol a
//! watch client meets: lists with `resourceVersion`, `limit`/`continue` paging and field
//! selectors (unknown fields are a 400, as on a real server); watches as chunked JSON lines
//! resuming from a `resourceVersion`, with ADDED/MODIFIED/DELETED computed against the field
//! selector (an object that stops matching is DELETED for that watch), BOOKMARK events,
//! `timeoutSeconds`, `410 Gone` (an ERROR event, or a 410 on a stale `continue`) once
//! history is compacted, bearer-token checks, and dropped connections on demand. Metadata-only
//! requests (`Accept: ...;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`, as kube's
//! `Api<PartialObjectMeta<K>>` sends) get `meta.k8s.io/v1` objects holding the metadata
//! alone; an `as=` that does not fit the request is a 406, as on a real server. Pods,
//! namespaces, ServiceAccounts, nodes and DaemonSets can be read one by one, created,
//! deleted, and patched
//! with the patch types a client sends: JSON Patch (`test` included: a failed test is 422, as
//! on a real server) and JSON merge patch (a `metadata.resourceVersion` in it is a
//! precondition: 409 when stale); anything else is 415. `/version` answers as a 1.33 server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Pod,
    Namespace,
    ServiceAccount,
    Node,
    DaemonSet,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Node => "Node",
            Kind::DaemonSet => "DaemonSet",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::DaemonSet => "apps/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::ServiceAccount | Kind::DaemonSet)
    }

    /// The fields a real server supports in field selectors for this kind.
    fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["metadata.name", "metadata.namespace", "spec.nodeName", "status.phase", "status.podIP"],
            Kind::Namespace => &["metadata.name", "status.phase"],
            Kind::ServiceAccount => &["metadata.name", "metadata.namespace"],
            Kind::Node => &["metadata.name", "spec.unschedulable"],
            Kind::DaemonSet => &["metadata.name", "metadata.namespace"],
        }
    }

    /// The kind a path names, with the namespace and name when given.
    fn route<'a>(segments: &[&'a str]) -> Option<(Kind, Option<&'a str>, Option<&'a str>)> {
        Some(match segments {
            ["api", "v1", "pods"] => (Kind::Pod, None, None),
            ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some(*ns), None),
            ["api", "v1", "namespaces", ns, "pods", name] => (Kind::Pod, Some(*ns), Some(*name)),
            ["api", "v1", "namespaces"] => (Kind::Namespace, None, None),
            ["api", "v1", "namespaces", name] => (Kind::Namespace, None, Some(*name)),
            ["api", "v1", "serviceaccounts"] => (Kind::ServiceAccount, None, None),
            ["api", "v1", "namespaces", ns, "serviceaccounts"] => (Kind::ServiceAccount, Some(*ns), None),
            ["api", "v1", "namespaces", ns, "serviceaccounts", name] => (Kind::ServiceAccount, Some(*ns), Some(*name)),
            ["api", "v1", "nodes"] => (Kind::Node, None, None),
            ["api", "v1", "nodes", name] => (Kind::Node, None, Some(*name)),
            ["apis", "apps", "v1", "daemonsets"] => (Kind::DaemonSet, None, None),
            ["apis", "apps", "v1", "namespaces", ns, "daemonsets"] => (Kind::DaemonSet, Some(*ns), None),
            ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] => (Kind::DaemonSet, Some(*ns), Some(*name)),
            _ => return None,
        })
    }
}

/// Where an object is stored: its kind, namespace ("" for cluster-scoped kinds) and name.
type Key = (Kind, String, String);

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let namespace = if kind.namespaced() { meta["namespace"].as_str().unwrap_or_default() } else { "" };
    (kind, namespace.to_string(), meta["name"].as_str().unwrap_or_default().to_string())
}

fn key(kind: Kind, namespace: &str, name: &str) -> Key {
    (kind, if kind.namespaced() { namespace.to_string() } else { String::new() }, name.to_string())
}

/// One change, as kept in the history watches replay from.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Events created through events.k8s.io/v1, with their patches applied.
    events: Vec<Value>,
    /// Watches and continues from before this resourceVersion get 410 Gone.
    compacted: u64,
    uid_counter: u64,
}

struct State {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped to drop every open watch connection.
    kill: watch::Sender<u64>,
    requests: Mutex<Vec<String>>,
    token: Option<String>,
    bookmark_every: Duration,
    /// While set, every request is answered 503, as by an API server that is down behind its
    /// load balancer.
    outage: std::sync::atomic::AtomicBool,
    /// Resources (`serviceaccounts`, ...) the client's RBAC does not let it read: 403.
    forbidden: Mutex<Vec<&'static str>>,
}

impl State {
    /// Stores a change at the next resourceVersion and tells the watches.
    fn commit(&self, inner: &mut Inner, kind: Kind, old: Option<Value>, new: Option<Value>) {
        inner.rv += 1;
        let rv = inner.rv;
        let mut new = new;
        if let Some(object) = new.as_mut() {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            object["kind"] = json!(kind.name());
            object["apiVersion"] = json!(kind.api_version());
        }
        let key = key_of(kind, new.as_ref().or(old.as_ref()).unwrap());
        match new.clone() {
            Some(object) => inner.objects.insert(key, object),
            None => inner.objects.remove(&key),
        };
        // A deletion is reported with the object's last state at the new resourceVersion.
        let old = old.map(|mut o| {
            if new.is_none() {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
            }
            o
        });
        let change = Change { rv, kind, old, new };
        inner.history.push_back(change.clone());
        let _ = self.changes.send(change);
    }
}

/// A running fake API server.
pub struct FakeApiServer {
    pub url: String,
    state: Arc<State>,
    /// The accept loop, stopped when the server is dropped.
    _task: crate::server::ServerTask,
}

impl FakeApiServer {
    /// Starts on a free loopback port, accepting any (or no) credentials.
    pub async fn start() -> Self {
        Self::start_with(None, Duration::from_secs(1)).await
    }

    /// Starts requiring `Authorization: Bearer <token>` when `token` is set.
    pub async fn start_with(token: Option<&str>, bookmark_every: Duration) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), token, bookmark_every)
    }

    /// Starts on `listener` (one bound inside a network namespace, say).
    pub fn start_on(listener: TcpListener, token: Option<&str>, bookmark_every: Duration) -> Self {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            inner: Mutex::new(Inner { rv: 100, ..Inner::default() }),
            changes: broadcast::channel(4096).0,
            kill: watch::channel(0).0,
            requests: Mutex::default(),
            token: token.map(str::to_string),
            bookmark_every,
            outage: std::sync::atomic::AtomicBool::new(false),
            forbidden: Mutex::new(Vec::new()),
        });
        let serving = state.clone();
        let task = crate::server::serve(listener, move |request| {
            let state = serving.clone();
            async move { handle(&state, request).await }
        });
        Self { url, state, _task: task }
    }

    /// Creates a pod (from [`PodBuilder::build`]); assigns uid, creationTimestamp, rv.
    pub fn create_pod(&self, mut pod: Value) -> String {
        let mut inner = self.state.inner.lock().unwrap();
        inner.uid_counter += 1;
        let uid = format!("uid-{}", inner.uid_counter);
        let meta = pod["metadata"].as_object_mut().unwrap();
        meta.entry("uid").or_insert(json!(uid));
        meta.entry("creationTimestamp").or_insert(json!(now_rfc3339()));
        let key = key_of(Kind::Pod, &pod);
        assert!(!inner.objects.contains_key(&key), "pod {key:?} exists");
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        self.commit(&mut inner, Kind::Pod, None, Some(pod));
        uid
    }

    /// Creates or replaces a Node with these labels and taints (`[{"key", "effect"}]`).
    pub fn put_node(&self, name: &str, labels: Value, taints: Value) {
        self.put(
            Kind::Node,
            json!({"metadata": {"name": name, "uid": format!("node-uid-{name}"), "labels": labels},
            "spec": {"taints": taints}, "status": {}}),
        );
    }

    /// The Node as stored now.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.state.inner.lock().unwrap().objects.get(&key(Kind::Node, "", name)).cloned()
    }

    /// Creates or replaces a DaemonSet whose pod template has this `spec`.
    pub fn put_daemonset(&self, namespace: &str, name: &str, pod_spec: Value) {
        self.put(
            Kind::DaemonSet,
            json!({"metadata": {"name": name, "namespace": namespace, "uid": format!("ds-uid-{name}")},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}}}),
        );
    }

    /// Changes a stored DaemonSet (a deletionTimestamp, say, as a foreground deletion sets).
    pub fn update_daemonset(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        self.update(Kind::DaemonSet, namespace, name, change);
    }

    /// Deletes a DaemonSet at once (background propagation: its pods stay until collected).
    pub fn delete_daemonset(&self, namespace: &str, name: &str) {
        self.delete(Kind::DaemonSet, namespace, name);
    }

    fn put(&self, kind: Kind, mut object: Value) {
        let mut inner = self.state.inner.lock().unwrap();
        object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        let old = inner.objects.get(&key_of(kind, &object)).cloned();
        self.commit(&mut inner, kind, old, Some(object));
    }

    fn update(&self, kind: Kind, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut inner = self.state.inner.lock().unwrap();
        let old = inner.objects.get(&key(kind, namespace, name)).cloned().expect("object exists");
        let mut new = old.clone();
        change(&mut new);
        self.commit(&mut inner, kind, Some(old), Some(new));
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.state.inner.lock().unwrap();
        let old = inner.objects.get(&key(kind, namespace, name)).cloned().expect("object exists");
        self.commit(&mut inner, kind, Some(old), None);
    }

    /// Changes a pod in place (status, annotations, deletionTimestamp...).
    pub fn update_pod(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        self.update(Kind::Pod, namespace, name, change);
    }

    /// Deletes a pod at once (no grace period).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete(Kind::Pod, namespace, name);
    }

    /// Creates or replaces a namespace with these annotations.
    pub fn put_namespace(&self, name: &str, annotations: Value) {
        let mut inner = self.state.inner.lock().unwrap();
        let old = inner.objects.get(&key(Kind::Namespace, "", name)).cloned();
        let uid = format!("ns-uid-{name}");
        let new = json!({"metadata": {"name": name, "uid": uid, "annotations": annotations,
                                      "creationTimestamp": now_rfc3339()},
                         "status": {"phase": "Active"}});
        self.commit(&mut inner, Kind::Namespace, old, Some(new));
    }

    /// Creates or replaces a ServiceAccount with these annotations.
    pub fn put_service_account(&self, namespace: &str, name: &str, annotations: Value) {
        let mut inner = self.state.inner.lock().unwrap();
        let old = inner.objects.get(&key(Kind::ServiceAccount, namespace, name)).cloned();
        let uid = old.as_ref().map_or_else(
            || format!("sa-uid-{namespace}-{name}"),
            |o| o["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
        );
        let new = json!({"metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": annotations,
                                      "creationTimestamp": now_rfc3339(),
                                      "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
                         "automountServiceAccountToken": true});
        self.commit(&mut inner, Kind::ServiceAccount, old, Some(new));
    }

    /// Deletes a ServiceAccount.
    pub fn delete_service_account(&self, namespace: &str, name: &str) {
        self.delete(Kind::ServiceAccount, namespace, name);
    }

    /// Closes every open watch connection mid-stream, as an API server restart or a load
    /// balancer timeout does.
    pub fn drop_watches(&self) {
        self.state.kill.send_modify(|n| *n += 1);
    }

    /// Answers every request for `resource` (a plural such as `serviceaccounts`) 403
    /// Forbidden, as a real server does when the client's ClusterRole lacks it.
    pub fn forbid(&self, resource: &'static str) {
        self.state.forbidden.lock().unwrap().push(resource);
    }

    /// Starts (or ends) an outage: open watches are dropped and every request is answered
    /// 503 until it ends.
    pub fn set_outage(&self, down: bool) {
        self.state.outage.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Changes the store without any watch seeing it (as if made while every watch was down
    /// and its events then compacted away).
    pub fn delete_pod_unseen(&self, namespace: &str, name: &str) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.objects.remove(&key(Kind::Pod, namespace, name));
        inner.rv += 1;
        // Compacted: resuming a watch (or a paged list) from any earlier resourceVersion
        // now gets 410 Gone, forcing a re-list.
        inner.history.clear();
        inner.compacted = inner.rv;
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<Value> {
        self.state.inner.lock().unwrap().events.clone()
    }

    /// The requests seen so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of watch requests that have been made for `path`.
    pub fn watch_count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.starts_with(&format!("GET {path}?")) && r.contains("watch=true")).count()
    }

    fn commit(&self, inner: &mut Inner, kind: Kind, old: Option<Value>, new: Option<Value>) {
        self.state.commit(inner, kind, old, new);
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Builds pod objects as the API server would hold them.
pub struct PodBuilder {
    pod: Value,
}

/// A pod `namespace/name` on node `node-a`, Running, without IPs yet.
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        pod: json!({
            "metadata": {"name": name, "namespace": namespace, "annotations": {}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"}
        }),
    }
}

impl PodBuilder {
    pub fn node(mut self, node: &str) -> Self {
        self.pod["spec"]["nodeName"] = json!(node);
        self
    }
    pub fn ip(self, ip: &str) -> Self {
        self.ips(&[ip])
    }
    pub fn ips(mut self, ips: &[&str]) -> Self {
        self.pod["status"]["podIP"] = json!(ips[0]);
        self.pod["status"]["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        self
    }
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.pod["metadata"]["annotations"][key] = json!(value);
        self
    }
    pub fn role(self, role: &str) -> Self {
        self.annotation("iam.amazonaws.com/role", role)
    }
    pub fn phase(mut self, phase: &str) -> Self {
        self.pod["status"]["phase"] = json!(phase);
        self
    }
    pub fn created(mut self, rfc3339: &str) -> Self {
        self.pod["metadata"]["creationTimestamp"] = json!(rfc3339);
        self
    }
    /// Runs as this ServiceAccount (`spec.serviceAccountName`; `default` otherwise).
    pub fn service_account(mut self, name: &str) -> Self {
        self.pod["spec"]["serviceAccountName"] = json!(name);
        self
    }
    pub fn host_network(mut self) -> Self {
        self.pod["spec"]["hostNetwork"] = json!(true);
        self
    }
    /// Run by the DaemonSet `name` (its controller ownerReference), as the agent's pod is.
    pub fn owned_by_daemonset(mut self, name: &str) -> Self {
        self.pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet",
            "name": name, "uid": format!("ds-uid-{name}"), "controller": true, "blockOwnerDeletion": true}]);
        self
    }
    pub fn build(self) -> Value {
        self.pod
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).map_err(|never| match never {}).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// `spec.nodeName=a,status.phase!=Failed`-style selectors over the fields a real server
/// supports for pods and namespaces; `Err` for an unsupported field, as a real server does.
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(text: Option<&str>, kind: Kind) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: {term}"));
            };
            if !kind.selectable_fields().contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.to_string()));
        }
        Ok(Self(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field.split('.').fold(object, |v, part| &v[part]).as_str().unwrap_or("");
            (actual == value) == *equal
        })
    }
}

/// How objects are answered: whole, or as `meta.k8s.io/v1` `PartialObjectMetadata` (the
/// metadata alone) when the client's `Accept` asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Representation {
    Full,
    Metadata,
}

impl Representation {
    /// From the `Accept` header: `as=PartialObjectMetadata` fits a get or a watch,
    /// `as=PartialObjectMetadataList` a list; anything else with `as=` is refused (406).
    fn negotiate(accept: Option<&str>, list: bool) -> Result<Self, Box<Response<Body>>> {
        let Some(accept) = accept else { return Ok(Representation::Full) };
        // The first acceptable media type wins, as on a real server.
        let Some(first) = accept.split(',').next() else { return Ok(Representation::Full) };
        let wanted = first.split(';').map(str::trim).find_map(|param| param.strip_prefix("as="));
        let expected = if list { "PartialObjectMetadataList" } else { "PartialObjectMetadata" };
        match wanted {
            None => Ok(Representation::Full),
            Some(wanted) if wanted == expected => Ok(Representation::Metadata),
            Some(wanted) => Err(Box::new(status(
                StatusCode::NOT_ACCEPTABLE,
                "NotAcceptable",
                &format!(
                    "only the following media types are accepted: application/json;as={expected};g=meta.k8s.io;v=v1 (not as={wanted})"
                ),
            ))),
        }
    }

    fn object(self, object: Value) -> Value {
        match self {
            Representation::Full => object,
            Representation::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
            }
        }
    }

    fn list(self, kind: Kind) -> (String, &'static str) {
        match self {
            Representation::Full => (format!("{}List", kind.name()), kind.api_version()),
            Representation::Metadata => ("PartialObjectMetadataList".into(), "meta.k8s.io/v1"),
        }
    }
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    url_decode_pairs(query.unwrap_or_default())
}

fn url_decode_pairs(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (crate::server::percent_decode(k), crate::server::percent_decode(v))
        })
        .collect()
}

async fn handle(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let uri = request.uri().clone();
    state.requests.lock().unwrap().push(format!("{} {}", request.method(), uri));
    if state.outage.load(std::sync::atomic::Ordering::SeqCst) {
        return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the API server is down");
    }
    if let Some(token) = &state.token {
        let given = request.headers().get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(&format!("Bearer {token}")) {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
    }
    match *request.method() {
        http::Method::GET => {}
        http::Method::POST | http::Method::DELETE | http::Method::PATCH => return write(state, request).await,
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "GET, POST, PATCH and DELETE are served",
            );
        }
    }
    if uri.path() == "/version" {
        return full(
            StatusCode::OK,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake", "gitTreeState": "clean",
                   "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    let query = query_map(uri.query());
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let Some((kind, namespace, name)) = Kind::route(&segments) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    };
    let resource = format!("{}s", kind.name().to_lowercase());
    if state.forbidden.lock().unwrap().iter().any(|forbidden| *forbidden == resource) {
        let message = format!(
            "{resource} is forbidden: User \"system:serviceaccount:kube-system:iamlet\" cannot list resource \"{resource}\" in API group \"\" at the cluster scope"
        );
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let accept = request.headers().get("accept").and_then(|v| v.to_str().ok());
    let representation = match Representation::negotiate(accept, name.is_none() && !watching) {
        Ok(representation) => representation,
        Err(refusal) => return *refusal,
    };
    if let Some(name) = name {
        let inner = state.inner.lock().unwrap();
        return match inner.objects.get(&key(kind, namespace.unwrap_or_default(), name)) {
            Some(object) => full(StatusCode::OK, representation.object(object.clone())),
            None => not_found(kind, name),
        };
    }
    let selector = match FieldSelector::parse(query.get("fieldSelector").map(String::as_str), kind) {
        Ok(selector) => selector,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let namespace = namespace.map(str::to_string);
    let in_scope = move |object: &Value| {
        namespace.as_deref().is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
            && selector.matches(object)
    };
    if watching {
        watch_response(state, kind, representation, &query, in_scope)
    } else {
        list_response(state, kind, representation, &query, in_scope)
    }
}

/// Writes, as kubectl and clients make them: `POST` to a collection creates, `DELETE` on an
/// object deletes it at once, `PATCH` applies a JSON Patch or a merge patch; and events.
async fn write(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    let content_type =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if let ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", rest @ ..] = segments.as_slice() {
        return write_event(state, &method, ns, rest.first().copied(), &body);
    }
    let Some((kind, namespace, name)) = Kind::route(&segments) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    };
    match (method, name) {
        (http::Method::POST, None) if kind.namespaced() == namespace.is_some() => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not a JSON object");
            };
            if !object["metadata"]["name"].is_string() {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value");
            }
            if let Some(ns) = namespace {
                object["metadata"]["namespace"] = json!(ns);
            }
            let mut inner = state.inner.lock().unwrap();
            let key = key_of(kind, &object);
            if inner.objects.contains_key(&key) {
                let message = format!("{} \"{}\" already exists", kind.name().to_lowercase(), key.2);
                return status(StatusCode::CONFLICT, "AlreadyExists", &message);
            }
            inner.uid_counter += 1;
            let uid = format!("uid-{}", inner.uid_counter);
            let meta = object["metadata"].as_object_mut().unwrap();
            meta.entry("uid").or_insert(json!(uid));
            meta.entry("creationTimestamp").or_insert(json!(now_rfc3339()));
            state.commit(&mut inner, kind, None, Some(object));
            full(StatusCode::CREATED, inner.objects[&key].clone())
        }
        (http::Method::DELETE, Some(name)) => {
            let mut inner = state.inner.lock().unwrap();
            match inner.objects.get(&key(kind, namespace.unwrap_or_default(), name)).cloned() {
                Some(object) => {
                    state.commit(&mut inner, kind, Some(object.clone()), None);
                    full(StatusCode::OK, object)
                }
                None => not_found(kind, name),
            }
        }
        (http::Method::PATCH, Some(name)) => {
            let mut inner = state.inner.lock().unwrap();
            let Some(old) = inner.objects.get(&key(kind, namespace.unwrap_or_default(), name)).cloned() else {
                return not_found(kind, name);
            };
            let mut new = old.clone();
            if let Err(response) = apply_patch(&content_type, &body, &mut new) {
                return *response;
            }
            // A patch cannot rename or re-identify an object.
            for field in ["name", "namespace", "uid", "creationTimestamp"] {
                new["metadata"][field] = old["metadata"][field].clone();
            }
            state.commit(&mut inner, kind, Some(old), Some(new));
            full(StatusCode::OK, inner.objects[&key(kind, namespace.unwrap_or_default(), name)].clone())
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not served for this path"),
    }
}

/// Applies a patch body of `content_type` to `object`, or answers as a real server would.
fn apply_patch(content_type: &str, body: &[u8], object: &mut Value) -> Result<(), Box<Response<Body>>> {
    let bad = |message: String| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", &message));
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/json-patch+json" => {
            let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            // A failed `test` (or a path that is not there) is 422, as on a real server.
            json_patch::patch(object, &patch)
                .map_err(|e| Box::new(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string())))
        }
        "application/merge-patch+json" => {
            let patch: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            let expected = patch["metadata"]["resourceVersion"].as_str();
            if expected.is_some_and(|rv| Some(rv) != object["metadata"]["resourceVersion"].as_str()) {
                return Err(Box::new(status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                )));
            }
            json_patch::merge(object, &patch);
            Ok(())
        }
        other => Err(Box::new(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the fake API server serves json-patch and merge-patch, not {other:?}"),
        ))),
    }
}

/// `POST .../events` and `PATCH .../events/<name>` (the series of a repeated event).
fn write_event(state: &Arc<State>, method: &http::Method, ns: &str, name: Option<&str>, body: &[u8]) -> Response<Body> {
    let Ok(mut event) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not a JSON object");
    };
    let mut inner = state.inner.lock().unwrap();
    match (method, name) {
        (&http::Method::POST, None) => {
            event["metadata"]["namespace"] = json!(ns);
            inner.events.push(event.clone());
            full(StatusCode::CREATED, event)
        }
        (&http::Method::PATCH, Some(name)) => {
            match inner.events.iter_mut().find(|e| e["metadata"]["name"] == json!(name)) {
                Some(stored) => {
                    stored["series"] = event["series"].clone();
                    full(StatusCode::OK, stored.clone())
                }
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("events \"{name}\" not found")),
            }
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "events are created and patched"),
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    status(StatusCode::NOT_FOUND, "NotFound", &format!("{}s \"{name}\" not found", kind.name().to_lowercase()))
}

fn list_response(
    state: &Arc<State>,
    kind: Kind,
    representation: Representation,
    query: &BTreeMap<String, String>,
    in_scope: impl Fn(&Value) -> bool,
) -> Response<Body> {
    let inner = state.inner.lock().unwrap();
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    // continue = "<rv>/<index of the next item>"
    let (list_rv, start) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed =
                token.split_once('/').and_then(|(rv, i)| Some((rv.parse::<u64>().ok()?, i.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, _)) if rv < inner.compacted => {
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                    );
                }
                Some(parsed) => parsed,
                None => return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token"),
            }
        }
        None => (inner.rv, 0),
    };
    let objects: Vec<&Value> =
        inner.objects.iter().filter(|((k, _, _), o)| *k == kind && in_scope(o)).map(|(_, o)| o).collect();
    let page: Vec<Value> =
        objects.iter().skip(start).take(limit).map(|o| representation.object((*o).clone())).collect();
    let next = start + page.len();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if next < objects.len() {
        metadata["continue"] = json!(format!("{list_rv}/{next}"));
        metadata["remainingItemCount"] = json!(objects.len() - next);
    }
    let (list_kind, api_version) = representation.list(kind);
    full(StatusCode::OK, json!({"kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": page}))
}

fn watch_response(
    state: &Arc<State>,
    kind: Kind,
    representation: Representation,
    query: &BTreeMap<String, String>,
    in_scope: impl Fn(&Value) -> bool + Send + 'static,
) -> Response<Body> {
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, std::io::Error>>();
    let send = move |tx: &futures::channel::mpsc::UnboundedSender<_>, mut event: Value| {
        if event["type"] != "ERROR" {
            event["object"] = representation.object(event["object"].take());
        }
        let mut line = event.to_string();
        line.push('\n');
        tx.unbounded_send(Ok(Frame::data(Bytes::from(line)))).is_ok()
    };

    // Under the lock: subscribe to live changes, then replay history, so nothing falls between.
    let inner = state.inner.lock().unwrap();
    let mut live = state.changes.subscribe();
    let mut kill = state.kill.subscribe();
    let from: u64 = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => {
            // "Any": synthetic ADDED events for the current state, then changes.
            let objects: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((k, _, _), o)| *k == kind && in_scope(o))
                .map(|(_, o)| o.clone())
                .collect();
            for object in objects {
                send(&tx, json!({"type": "ADDED", "object": object}));
            }
            inner.rv
        }
        Some(text) => match text.parse::<u64>() {
            Ok(rv) if rv < inner.compacted => {
                send(
                    &tx,
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": format!("too old resource version: {rv} ({})", inner.compacted),
                        "reason": "Expired", "code": 410}}),
                );
                drop(tx);
                drop(inner);
                return stream_response(rx);
            }
            Ok(rv) => {
                for change in inner.history.iter().filter(|c| c.rv > rv && c.kind == kind) {
                    if let Some(event) = event_for(change, &in_scope) {
                        send(&tx, event);
                    }
                }
                inner.rv.max(rv)
            }
            Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid resourceVersion"),
        },
    };
    let current_rv = inner.rv;
    drop(inner);
    kill.mark_unchanged();

    let bookmark_every = state.bookmark_every;
    tokio::spawn(async move {
        let mut last_rv = from.max(current_rv);
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(bookmark_every);
        ticks.tick().await;
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    Ok(change) if change.rv <= from || change.kind != kind => {}
                    Ok(change) => {
                        last_rv = change.rv;
                        if let Some(event) = event_for(&change, &in_scope)
                            && !send(&tx, event)
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => {
                        // A real server closes watches it cannot keep up with.
                        return;
                    }
                },
                _ = ticks.tick(), if bookmarks => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": "v1",
                        "metadata": {"resourceVersion": last_rv.to_string()}}});
                    if !send(&tx, bookmark) { return; }
                }
                _ = kill.changed() => {
                    // Abort the response mid-stream: the client sees the connection drop.
                    let _ = tx.unbounded_send(Err(std::io::Error::other("connection dropped by the fake API server")));
                    return;
                }
                () = &mut deadline => return, // timeoutSeconds: end the stream cleanly
            }
        }
    });
    stream_response(rx)
}

/// The watch event `change` is for a watch whose scope is `in_scope`, if any.
fn event_for(change: &Change, in_scope: &impl Fn(&Value) -> bool) -> Option<Value> {
    let was = change.old.as_ref().is_some_and(in_scope);
    let is = change.new.as_ref().is_some_and(in_scope);
    let (kind, object) = match (was, is) {
        (false, true) => ("ADDED", change.new.clone()?),
        (true, true) => ("MODIFIED", change.new.clone()?),
        (true, false) => {
            // Deleted, or no longer matching the selector: the last state, at this rv.
            let mut last = change.new.clone().unwrap_or_else(|| change.old.clone().unwrap());
            last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", last)
        }
        (false, false) => return None,
    };
    Some(json!({"type": kind, "object": object}))
}

fn stream_response(
    rx: futures::channel::mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>,
) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(rx.map(|frame| frame))))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_client::request;

    const LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";
    const ONE: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json";

    #[tokio::test]
    async fn metadata_requests_get_the_metadata_alone_as_a_real_server_answers_them() {
        let api = FakeApiServer::start().await;
        api.put_service_account("shop", "web", json!({"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}));
        let addr: std::net::SocketAddr = api.url.trim_start_matches("http://").parse().unwrap();
        let get = async |path: &str, accept: &str| request("127.0.0.1", addr, "GET", path, &[("accept", accept)]).await;

        let list = get("/api/v1/serviceaccounts", LIST).await.json();
        assert_eq!(
            (list["kind"].as_str(), list["apiVersion"].as_str()),
            (Some("PartialObjectMetadataList"), Some("meta.k8s.io/v1"))
        );
        let item = &list["items"][0];
        assert_eq!(item["kind"], "PartialObjectMetadata");
        assert_eq!(item["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], "arn:aws:iam::1:role/r");
        assert!(item.get("automountServiceAccountToken").is_none(), "only the metadata: {item}");

        let one = get("/api/v1/namespaces/shop/serviceaccounts/web", ONE).await.json();
        assert_eq!(
            (one["kind"].as_str(), one["metadata"]["name"].as_str()),
            (Some("PartialObjectMetadata"), Some("web"))
        );
        let whole = get("/api/v1/namespaces/shop/serviceaccounts/web", "application/json").await.json();
        assert_eq!(
            (whole["kind"].as_str(), whole["automountServiceAccountToken"].as_bool()),
            (Some("ServiceAccount"), Some(true))
        );

        let mismatched = get("/api/v1/serviceaccounts", ONE).await;
        assert_eq!(mismatched.status, 406, "a list asked as one object: {}", mismatched.body);
    }
}
