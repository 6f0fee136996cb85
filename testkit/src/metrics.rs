//! Reading the agent's Prometheus text exposition.

/// The value of the first sample of `selector` in a Prometheus text exposition. A bare name
/// (`iamlet_pods_indexed`) matches the metric with or without labels; a name with its labels
/// (`iamlet_connections_refused_total{reason="total"}`) matches that series exactly.
pub fn metric_value(text: &str, selector: &str) -> Option<f64> {
    let labelled = selector.contains('{');
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(selector)
                .is_some_and(|rest| rest.starts_with(' ') || (!labelled && rest.starts_with('{')))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    const TEXT: &str = "# HELP iamlet_pods_indexed Pods.\n\
                        iamlet_pods_indexed_total 9\n\
                        iamlet_pods_indexed 3\n\
                        iamlet_refused_total{reason=\"per-ip\"} 2\n\
                        iamlet_refused_total{reason=\"total\"} 5\n";

    #[test]
    fn a_bare_name_matches_that_metric_only() {
        assert_eq!(metric_value(TEXT, "iamlet_pods_indexed"), Some(3.0));
        assert_eq!(metric_value(TEXT, "iamlet_refused_total"), Some(2.0));
        assert_eq!(metric_value(TEXT, "iamlet_pods"), None);
    }

    #[test]
    fn labels_select_one_series() {
        assert_eq!(metric_value(TEXT, "iamlet_refused_total{reason=\"total\"}"), Some(5.0));
        assert_eq!(metric_value(TEXT, "iamlet_refused_total{reason=\"tot"), None);
    }
}
