//! Bodies shaped exactly as IMDS answers them.

use bytes::Bytes;
use serde::Serialize;

use crate::credentials::Issued;

/// The credential document of `GET .../security-credentials/<role>`, field for field and in
/// IMDS's order.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument<'a> {
    code: &'a str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
}

/// Renders `issued` as IMDS does (times in UTC, to the second).
pub fn credentials(issued: &Issued) -> Bytes {
    let creds = &issued.credentials;
    let document = CredentialDocument {
        code: "Success",
        last_updated: humantime::format_rfc3339_seconds(issued.obtained).to_string(),
        kind: "AWS-HMAC",
        access_key_id: &creds.access_key_id,
        secret_access_key: &creds.secret_access_key,
        token: &creds.session_token,
        expiration: humantime::format_rfc3339_seconds(creds.expiration).to_string(),
    };
    Bytes::from(serde_json::to_vec_pretty(&document).expect("a plain struct always serialises"))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::credentials::Credentials;

    #[test]
    fn matches_the_imds_document() {
        let issued = Issued::new(
            Credentials {
                access_key_id: "ASIAEXAMPLE".into(),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            },
            UNIX_EPOCH + Duration::from_secs(1_799_996_400),
        );
        let body: serde_json::Value = serde_json::from_slice(&credentials(&issued)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2027-01-15T07:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIAEXAMPLE",
                "SecretAccessKey": "secret",
                "Token": "token",
                "Expiration": "2027-01-15T08:00:00Z",
            })
        );
        let text = String::from_utf8(credentials(&issued).to_vec()).unwrap();
        assert!(text.find("Code").unwrap() < text.find("Expiration").unwrap(), "IMDS's field order");
    }
}
