//! Kubernetes Events on pods that are denied a role or whose role STS refuses, so
//! `kubectl describe pod` shows why the pod has no credentials (`--pod-events`), and on pods
//! whose metadata traffic iamlet's rules do not intercept (always).
//!
//! Requests never wait for the API server: they hand the event to a bounded queue (dropped
//! when full) and a background task publishes it, at most once per pod and reason in
//! [`REPEAT_AFTER`], however often the pod retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::pod::PodIdentity;

/// The API server's limit on an event's note, in bytes.
const MAX_NOTE: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary: a note quotes the pod's
/// annotation, and cutting inside a multi-byte character would panic the publisher.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let cut = (0..=max).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(cut);
    }
    text
}

/// The same pod and reason is reported again only after this long.
pub const REPEAT_AFTER: Duration = Duration::from_secs(300);
const QUEUE: usize = 256;

/// Why an event is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Policy refused the pod a role (no role, bad annotation, namespace restrictions).
    RoleDenied,
    /// AssumeRole failed for the pod's role.
    AssumeRoleFailed,
    /// The pod's traffic arrives on an interface `--host-interface` does not match: it
    /// reaches the node's metadata service directly.
    NotIntercepted,
    /// `--bind-pod-ports` is on and iamlet knows no port for the pod (or the CNI's record
    /// names another pod at its address): refused, so no other pod can pass for it.
    Unbound,
}

impl Reason {
    /// What iamlet was doing: serving credentials, or intercepting the pod's traffic.
    fn action(self) -> &'static str {
        match self {
            Reason::RoleDenied | Reason::AssumeRoleFailed => "ServeCredentials",
            Reason::NotIntercepted => "InterceptMetadataTraffic",
            Reason::Unbound => "BindPodPort",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Reason::RoleDenied => "IAMRoleDenied",
            Reason::AssumeRoleFailed => "IAMAssumeRoleFailed",
            Reason::NotIntercepted => "IAMNotIntercepted",
            Reason::Unbound => "IAMPodUnbound",
        }
    }
}

struct Report {
    pod: Arc<PodIdentity>,
    reason: Reason,
    note: String,
}

/// The handle requests report through. Cheap to clone.
#[derive(Clone)]
pub struct PodEvents {
    queue: mpsc::Sender<Report>,
}

impl PodEvents {
    /// Starts the publisher; returns the handle and the task to spawn.
    pub fn start(client: kube::Client, node: &str) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (queue, reports) = mpsc::channel(QUEUE);
        let reporter = Reporter { controller: "iamlet".into(), instance: Some(format!("iamlet-{node}")) };
        (Self { queue }, publish(Recorder::new(client, reporter), reports))
    }

    /// Queues an event for `pod`; never waits.
    pub fn report(&self, pod: &Arc<PodIdentity>, reason: Reason, note: String) {
        let _ = self.queue.try_send(Report { pod: pod.clone(), reason, note });
    }
}

async fn publish(recorder: Recorder, mut reports: mpsc::Receiver<Report>) {
    let mut last_sent: HashMap<(String, Reason), Instant> = HashMap::new();
    while let Some(report) = reports.recv().await {
        let now = Instant::now();
        last_sent.retain(|_, sent| now.duration_since(*sent) < REPEAT_AFTER);
        let key = (report.pod.uid.clone(), report.reason);
        if last_sent.contains_key(&key) {
            continue;
        }
        last_sent.insert(key, now);
        let pod = &report.pod;
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        };
        let note = truncated(report.note, MAX_NOTE);
        let event = Event {
            type_: EventType::Warning,
            reason: report.reason.as_str().into(),
            note: Some(note),
            action: report.reason.action().into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, %error, "cannot record an event on the pod");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_character_boundaries() {
        let annotation = "é".repeat(500); // 1000 bytes
        let note = truncated(format!("role annotation {annotation:?} is unusable"), MAX_NOTE);
        assert!(note.len() <= MAX_NOTE && note.starts_with("role annotation \"éé"));
        assert_eq!(truncated("a€".repeat(400), 5), "a€a");
        assert_eq!(truncated("short".into(), MAX_NOTE), "short");
    }
}
