//! Parsers for flag values, kube2iam's forms included.

use std::time::Duration;

/// Go-style durations (`15m`, `2s`, `1h30m`), as kube2iam takes them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 30s, 15m or 1h ({e})"))
}

/// A rate in calls per second: a positive number up to 10,000 (`10`, `0.5`).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: a number of calls per second above 0 and at most 10000, like 10 or 0.5"
        )),
    }
}

/// Go's `strconv.ParseBool`, which kube2iam's flags use: `--flag=1`, `=t`, `=TRUE`, `=False`.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean (true or false)")),
    }
}

pub fn parse_log_level(text: &str) -> Result<tracing::Level, String> {
    match text.to_ascii_lowercase().as_str() {
        "trace" => Ok(tracing::Level::TRACE),
        "debug" => Ok(tracing::Level::DEBUG),
        "info" => Ok(tracing::Level::INFO),
        "warn" | "warning" => Ok(tracing::Level::WARN),
        "error" | "fatal" | "panic" => Ok(tracing::Level::ERROR),
        _ => Err(format!("{text:?} is not one of trace, debug, info, warn, error")),
    }
}

/// A taint key: a qualified name (`[prefix/]name`), as the API server validates it.
pub fn parse_taint_key(key: &str) -> Result<String, String> {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    if name_ok && prefix_ok {
        Ok(key.to_string())
    } else {
        Err(format!("{key:?} is not a taint key like iamlet.io/agent-not-ready"))
    }
}

/// `host[:port]`, an IP or a name; the port defaults to 80. A scheme is tolerated
/// (`http://169.254.169.254`) since kube2iam configurations sometimes carry one.
pub fn parse_metadata_addr(text: &str) -> Result<http::uri::Authority, String> {
    let trimmed = text.trim().trim_start_matches("http://").trim_end_matches('/');
    if trimmed.is_empty() || trimmed.contains('/') {
        return Err(format!("{text:?} is not host[:port]"));
    }
    let authority: http::uri::Authority = trimmed.parse().map_err(|_| format!("{text:?} is not host[:port]"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{text:?} is not host[:port]"));
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_booleans_take_go_spellings() {
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(yes), Ok(true), "{yes}");
        }
        for no in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(no), Ok(false), "{no}");
        }
        assert!(parse_go_bool("yes").is_err());
    }

    #[test]
    fn metadata_addr_takes_host_and_port() {
        assert_eq!(parse_metadata_addr("127.0.0.1:9000").unwrap().port_u16(), Some(9000));
        assert_eq!(parse_metadata_addr("http://169.254.169.254/").unwrap().host(), "169.254.169.254");
        assert!(parse_metadata_addr("user@host").is_err());
    }
}
