//! Prometheus metrics, registered once and recorded into by every module.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpoofLabels {
    /// What the dropped frame forged: `ether` (a bound pod's MAC), `arp`, `ipv4`, `ipv6`.
    pub family: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

impl From<crate::http::Refusal> for RefusalLabels {
    fn from(refusal: crate::http::Refusal) -> Self {
        let reason = match refusal {
            crate::http::Refusal::Total => "total",
            crate::http::Refusal::PerIp => "per-ip",
        };
        Self { reason }
    }
}

/// Every metric iamlet exports. Cheap to record into from any task.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub requests_in_flight: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub sts_calls: Family<StsLabels, Counter>,
    pub sts_duration: Histogram,
    pub sts_budget_tokens: Gauge<f64, AtomicU64>,
    pub sts_background_pace: Gauge<f64, AtomicU64>,
    pub credentials_served_late: Counter,
    pub pods_indexed: Gauge,
    pub watch_errors: Family<WatchLabels, Counter>,
    pub iptables_repairs: Counter,
    pub iptables_errors: Counter,
    pub pods_not_intercepted: Gauge,
    pub spoofed_packets: Family<SpoofLabels, Counter>,
    pub pods_unbound: Gauge,
    pub node_imdsv1_enabled: Gauge,
    pub pod_watch_stale_seconds: Gauge,
    pub connections_refused: Family<RefusalLabels, Counter>,
    pub registry: Registry,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0].into_iter()
}

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        let requests_in_flight = Gauge::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let sts_calls = Family::<StsLabels, Counter>::default();
        let sts_duration = Histogram::new(latency_buckets());
        let sts_budget_tokens = Gauge::<f64, AtomicU64>::default();
        let sts_background_pace = Gauge::<f64, AtomicU64>::default();
        let credentials_served_late = Counter::default();
        let pods_indexed = Gauge::default();
        let watch_errors = Family::<WatchLabels, Counter>::default();
        let iptables_repairs = Counter::default();
        let iptables_errors = Counter::default();
        let pods_not_intercepted = Gauge::default();
        let spoofed_packets = Family::<SpoofLabels, Counter>::default();
        let pods_unbound = Gauge::default();
        let node_imdsv1_enabled = Gauge::default();
        let pod_watch_stale_seconds = Gauge::default();
        let connections_refused = Family::<RefusalLabels, Counter>::default();

        let mut registry = Registry::with_prefix("iamlet");
        registry.register("http_requests", "Metadata API requests by route and status code", requests.clone());
        registry.register("http_request_duration_seconds", "Metadata API latency by route", request_duration.clone());
        registry.register(
            "http_requests_in_flight",
            "Metadata API requests being answered, those waiting for their pod, STS or the node's metadata service included",
            requests_in_flight.clone(),
        );
        registry.register("credential_cache_hits", "Credential requests served from memory", cache_hits.clone());
        registry.register(
            "credential_cache_misses",
            "Credential requests that had to wait for STS",
            cache_misses.clone(),
        );
        registry.register("sts_assume_role_calls", "STS AssumeRole calls by result", sts_calls.clone());
        registry.register("sts_assume_role_duration_seconds", "STS AssumeRole latency", sts_duration.clone());
        registry.register(
            "sts_budget_tokens",
            "AssumeRole calls the node may still make at once under --sts-max-rps and --sts-burst (as of its last call or refresh scan)",
            sts_budget_tokens.clone(),
        );
        registry.register(
            "sts_background_pace",
            "AssumeRole calls per second the node allows its refreshes and prefetches now: grows with each call STS accepts, halves when it throttles",
            sts_background_pace.clone(),
        );
        registry.register(
            "credentials_served_late",
            "Credentials handed to pods with less than 15 minutes left: refreshes have been failing (STS throttling or errors)",
            credentials_served_late.clone(),
        );
        registry.register("pods_indexed", "Pods of this node in the index", pods_indexed.clone());
        registry.register("watch_errors", "Kubernetes watch errors by watch", watch_errors.clone());
        registry.register(
            "iptables_repairs",
            "Times iamlet's rules were found changed and reinstalled",
            iptables_repairs.clone(),
        );
        registry.register("iptables_errors", "Failed checks or repairs of iamlet's rules", iptables_errors.clone());
        registry.register(
            "pods_not_intercepted",
            "Pods of this node whose traffic arrives on an interface the DNAT rule does not match",
            pods_not_intercepted.clone(),
        );
        registry.register(
            "spoofed_packets",
            "Frames the kernel dropped because they claimed a pod's address or MAC from another port, or reached for the metadata address from an unbound one, by what they forged",
            spoofed_packets.clone(),
        );
        registry.register(
            "pods_unbound",
            "Pods of this node whose port iamlet does not know (no CNI record): refused while --bind-pod-ports is on",
            pods_unbound.clone(),
        );
        registry.register(
            "node_imdsv1_enabled",
            "1 when the node's metadata service answers without a token (IMDSv1), so pods reach the node's credentials whenever iamlet's rules are absent",
            node_imdsv1_enabled.clone(),
        );
        registry.register(
            "pod_watch_stale_seconds",
            "How long the pod watch has been failing (0 while it is current): pods known before keep being served",
            pod_watch_stale_seconds.clone(),
        );
        registry.register(
            "connections_refused",
            "Metadata API connections closed at once, over --max-connections (total) or --max-connections-per-ip (per-ip)",
            connections_refused.clone(),
        );

        // Series with known labels start at zero, so a rate or an error ratio is defined from
        // the first scrape rather than once the first error has happened.
        for result in ["success", "error", "throttled"] {
            sts_calls.get_or_create(&StsLabels { result }).inc_by(0);
        }
        watch_errors.get_or_create(&WatchLabels { watch: "pods" }).inc_by(0);
        for family in ["ether", "arp", "ipv4", "ipv6"] {
            spoofed_packets.get_or_create(&SpoofLabels { family }).inc_by(0);
        }
        for refusal in [crate::http::Refusal::Total, crate::http::Refusal::PerIp] {
            connections_refused.get_or_create(&RefusalLabels::from(refusal)).inc_by(0);
        }

        Self {
            requests,
            request_duration,
            requests_in_flight,
            cache_hits,
            cache_misses,
            sts_calls,
            sts_budget_tokens,
            sts_background_pace,
            credentials_served_late,
            sts_duration,
            pods_indexed,
            watch_errors,
            iptables_repairs,
            iptables_errors,
            pods_not_intercepted,
            spoofed_packets,
            pods_unbound,
            node_imdsv1_enabled,
            pod_watch_stale_seconds,
            connections_refused,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one unit in `gauge` for as long as it lives: a request in flight, however it ends
/// (answered, or dropped when its client goes away).
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_until_dropped() {
        let gauge = Gauge::<i64>::default();
        let first = InFlight::enter(&gauge);
        let second = InFlight::enter(&gauge);
        assert_eq!(gauge.get(), 2);
        drop(first);
        assert_eq!(gauge.get(), 1);
        drop(second);
        assert_eq!(gauge.get(), 0);
    }
}
