//! What operators monitor stays true to what iamlet exports: every metric the README lists
//! and every metric the monitoring component's alerts use is exported, and every exported
//! metric is in the README.

use std::collections::BTreeSet;

use iamlet_testkit::node::TestNode;
use iamlet_testkit::repo_root;

/// The metric names `/metrics` exports, as queries name them (`_total` for counters).
fn exported(openmetrics: &str) -> BTreeSet<String> {
    openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| if kind == "counter" { format!("{name}_total") } else { name.to_string() })
        .collect()
}

/// Every `iamlet_...` name in `text`, histogram series folded into their family.
fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("iamlet_") {
        let tail = &rest[start..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn the_readme_and_the_alerts_name_exactly_the_metrics_iamlet_exports() {
    let node = TestNode::start(&["--backoff-max-elapsed-time=10ms"]).await;
    // One request, so the per-route series exist (the other families start at zero).
    node.get("127.0.0.70", "/latest/meta-data/iam/security-credentials/").await;
    let exported = exported(&node.admin_get("/metrics").await.body);
    assert!(exported.contains("iamlet_pods_not_intercepted"), "{exported:?}");

    let readme = read("README.md");
    let section = readme.split("## Metrics").nth(1).expect("the README has a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let documented = named_in(section);
    assert_eq!(documented, exported, "the README's Metrics section lists every exported metric, and only those");

    let alerts = named_in(&read("manifests/components/monitoring/prometheusrule.yaml"));
    assert!(!alerts.is_empty());
    let unknown: Vec<_> = alerts.difference(&exported).collect();
    assert!(unknown.is_empty(), "the alerts use metrics iamlet does not export: {unknown:?}");
}
