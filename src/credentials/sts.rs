//! STS AssumeRole, behind a small trait so the cache can be tested without a network.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::{IdentityCache, Region, timeout::TimeoutConfig};
use aws_sdk_sts::error::SdkError;
use aws_sdk_sts::types::Tag;
use futures::future::BoxFuture;

use super::Credentials;
use crate::policy::RoleArn;
use crate::resolve::{CredentialKey, MAX_CHAINED_SESSION, SessionTag, session_name};

/// An AssumeRole failure, as STS (or the way to it) reported it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct StsError {
    /// STS's error code (`AccessDenied`, `RegionDisabledException`...), if it answered.
    pub code: Option<String>,
    pub message: String,
    /// Whether trying again can succeed.
    pub failure: Failure,
}

/// What a failed AssumeRole says about trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// STS throttled the account (`Throttling`, `RequestLimitExceeded`...): try again later,
    /// and the node as a whole slower.
    Throttled,
    /// STS or the way to it failed (a 5xx, a timeout, a lost connection): try again later.
    Transient,
    /// STS refused the call (`AccessDenied`, a malformed policy or ARN, a disabled region, an
    /// expired token of iamlet's own): the same call would get the same answer.
    Final,
}

impl Failure {
    /// Whether the call is worth another try.
    pub fn is_retryable(self) -> bool {
        self != Failure::Final
    }
}

/// The error codes AWS services answer when they throttle (the SDKs' own list, STS's among
/// them): the query protocol's `Throttling` and `RequestLimitExceeded` are STS's.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "EC2ThrottledException",
];

/// Codes of failures on STS's side that another try can get past.
const TRANSIENT_CODES: &[&str] = &[
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "IDPCommunicationError",
];

/// What an answer of STS with `code` and HTTP `status` says about trying again: throttling
/// by its code (STS answers it with 400), STS's own failures by their code or a 5xx (or a 429
/// without a code), anything else final.
pub fn classify(code: Option<&str>, status: Option<u16>) -> Failure {
    match (code, status) {
        (Some(code), _) if THROTTLING_CODES.contains(&code) => Failure::Throttled,
        (_, Some(429)) => Failure::Throttled,
        (Some(code), _) if TRANSIENT_CODES.contains(&code) => Failure::Transient,
        (_, Some(status)) if status >= 500 => Failure::Transient,
        _ => Failure::Final,
    }
}

impl StsError {
    /// A failure no other try can get past, not from STS's answer.
    pub fn other(message: impl Into<String>) -> Self {
        Self { code: None, message: message.into(), failure: Failure::Final }
    }

    /// A failure on the way to STS (no answer in time, a lost connection): another try may
    /// succeed.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { code: None, message: message.into(), failure: Failure::Transient }
    }

    /// STS's answer `code` (with HTTP `status`) and its message.
    pub fn answered(code: Option<String>, message: impl Into<String>, status: Option<u16>) -> Self {
        let failure = classify(code.as_deref(), status);
        Self { code, message: message.into(), failure }
    }

    /// An error of the SDK's client: STS's answer classified by its code and status; no
    /// answer (a timeout, a connection that failed or broke, an answer that could not be
    /// read) is transient; a request that could not even be built is final.
    fn from_sdk<E>(error: &SdkError<E, HttpResponse>) -> Self
    where
        E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        let context = || aws_smithy_types::error::display::DisplayErrorContext(error).to_string();
        match error {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let message = service.err().message().map(str::to_string).unwrap_or_else(context);
                Self::answered(service.err().code().map(str::to_string), message, Some(status))
            }
            SdkError::ConstructionFailure(_) => Self::other(context()),
            _ => Self::transient(context()),
        }
    }
}

/// Something that can assume a role: STS in production, a fake in unit tests.
pub trait RoleAssumer: Send + Sync + 'static {
    fn assume_role<'a>(
        &'a self,
        key: &'a CredentialKey,
        duration: Duration,
    ) -> BoxFuture<'a, Result<Credentials, StsError>>;

    /// The account of the credentials iamlet itself runs with (GetCallerIdentity).
    fn own_account(&self) -> BoxFuture<'_, Result<String, StsError>> {
        Box::pin(async { Err(StsError::other("this STS client cannot tell its own account")) })
    }
}

/// Discovery asks any assumer for the account of iamlet's own credentials.
impl crate::policy::CallerAccount for Arc<dyn RoleAssumer> {
    fn caller_account(&self) -> BoxFuture<'_, Result<String, crate::policy::BoxError>> {
        Box::pin(async move { self.own_account().await.map_err(Into::into) })
    }
}

/// AssumeRole through aws-sdk-sts.
#[derive(Debug, Clone)]
pub struct AwsSts {
    /// With iamlet's own credentials (the node's): GetCallerIdentity, and the intermediate
    /// role's sessions.
    own: aws_sdk_sts::Client,
    /// Assumes the pods' roles: with iamlet's own credentials, or with `--assume-role-arn`
    /// with the intermediate role's.
    pods: aws_sdk_sts::Client,
}

/// How long before its expiry the intermediate role's session (`--assume-role-arn`) is
/// renewed: the next AssumeRole for a pod inside this window renews it first, so a pod's
/// call is never signed with credentials about to expire.
pub const INTERMEDIATE_REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);

/// How iamlet reaches STS and as whom, from the STS flags.
#[derive(Debug, Clone)]
pub struct StsClientSettings {
    /// `--use-regional-sts-endpoint`.
    pub regional: bool,
    /// `--sts-timeout`.
    pub timeout: Duration,
    /// `--assume-role-arn`: the pods' roles are assumed with this role's credentials.
    pub intermediate_role: Option<RoleArn>,
    /// Who iamlet is, for the intermediate session's name: the node.
    pub node: String,
}

/// The global STS endpoint, used when `--use-regional-sts-endpoint` is off (kube2iam's
/// default), unless an endpoint was configured explicitly (`AWS_ENDPOINT_URL_STS`,
/// `AWS_ENDPOINT_URL`) or the partition has no global endpoint (China, GovCloud, ISO).
/// Returns the URL and the region requests to it are signed for.
pub fn global_endpoint(
    regional: bool,
    explicit_endpoint: bool,
    region: Option<&str>,
) -> Option<(&'static str, &'static str)> {
    let partition_has_global =
        region.is_none_or(|r| !(r.starts_with("cn-") || r.starts_with("us-gov-") || r.starts_with("us-iso")));
    (!regional && !explicit_endpoint && partition_has_global).then_some(("https://sts.amazonaws.com", "us-east-1"))
}

impl AwsSts {
    /// Builds the clients from the SDK's standard configuration: environment, profile, web
    /// identity, the node's instance profile; `AWS_REGION`; `AWS_ENDPOINT_URL_STS`.
    pub async fn from_environment(settings: &StsClientSettings) -> Self {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let explicit = sdk.endpoint_url().is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_STS").is_some()
            || std::env::var_os("AWS_ENDPOINT_URL").is_some();
        let sdk = match global_endpoint(settings.regional, explicit, sdk.region().map(|r| r.as_ref())) {
            Some((url, signing_region)) => {
                sdk.into_builder().endpoint_url(url).region(Region::new(signing_region)).build()
            }
            None => sdk,
        };
        Self::from_sdk_config(&sdk, settings).await
    }

    /// Builds the clients from an explicit configuration (tests, embedding): its credentials
    /// are iamlet's own.
    pub async fn from_sdk_config(sdk: &SdkConfig, settings: &StsClientSettings) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(settings.timeout)
            .operation_attempt_timeout(settings.timeout / 2)
            .connect_timeout(Duration::from_secs(2).min(settings.timeout))
            .build();
        let sdk = sdk.to_builder().timeout_config(timeouts.clone()).build();
        let own = aws_sdk_sts::Client::new(&sdk);
        // The pods' calls are tried once by the SDK: iamlet retries them itself, what is worth
        // it only, each try under the node's budget (see `queue`), so a throttled STS sees
        // fewer calls, not the SDK's three attempts per call on top.
        let once = aws_sdk_sts::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts.to_builder().operation_attempt_timeout(settings.timeout).build());
        let pods = match &settings.intermediate_role {
            None => aws_sdk_sts::Client::from_conf(once.build()),
            Some(role) => {
                // aws-config's provider assumes the role with the node's credentials; the
                // client's identity cache renews its session ahead of expiry.
                let provider = AssumeRoleProvider::builder(role.as_str())
                    .session_name(session_name("iamlet", &settings.node))
                    .session_length(MAX_CHAINED_SESSION)
                    .configure(&sdk)
                    .build()
                    .await;
                let config = once
                    .credentials_provider(provider)
                    .identity_cache(IdentityCache::lazy().buffer_time(INTERMEDIATE_REFRESH_BEFORE).build())
                    .build();
                aws_sdk_sts::Client::from_conf(config)
            }
        };
        Self { own, pods }
    }

    pub fn into_assumer(self) -> Arc<dyn RoleAssumer> {
        Arc::new(self)
    }
}

impl RoleAssumer for AwsSts {
    fn own_account(&self) -> BoxFuture<'_, Result<String, StsError>> {
        Box::pin(async move {
            let identity = self.own.get_caller_identity().send().await.map_err(|e| StsError::from_sdk(&e))?;
            identity.account.ok_or_else(|| StsError::other("GetCallerIdentity named no account"))
        })
    }

    fn assume_role<'a>(
        &'a self,
        key: &'a CredentialKey,
        duration: Duration,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let output = self
                .pods
                .assume_role()
                .role_arn(key.role.as_str())
                .role_session_name(key.session_name.as_ref())
                .duration_seconds(duration.as_secs() as i32)
                .set_external_id(key.external_id.as_deref().map(str::to_string))
                .set_tags(key.tags.as_deref().map(session_tags))
                .set_transitive_tag_keys(
                    key.tags.as_deref().map(|tags| tags.iter().map(|tag| tag.key.to_string()).collect()),
                )
                .set_source_identity(key.source_identity.as_deref().map(str::to_string))
                .send()
                .await
                .map_err(|error| with_source_identity_hint(StsError::from_sdk(&error), key))?;
            let creds =
                output.credentials.ok_or_else(|| StsError::transient("AssumeRole answered without credentials"))?;
            let expiration = SystemTime::try_from(creds.expiration)
                .map_err(|_| StsError::other("AssumeRole answered an unusable expiration"))?;
            Ok(Credentials {
                access_key_id: creds.access_key_id,
                secret_access_key: creds.secret_access_key,
                session_token: creds.session_token,
                expiration,
            })
        })
    }
}

/// A refusal of a call that set `SourceIdentity` names the permission it needs: without
/// `sts:SetSourceIdentity` in the role's trust policy, STS refuses every such call.
fn with_source_identity_hint(mut error: StsError, key: &CredentialKey) -> StsError {
    if key.source_identity.is_some() && error.code.as_deref() == Some("AccessDenied") {
        error.message.push_str(
            " (with --source-identity, the role's trust policy must allow sts:SetSourceIdentity as well as sts:AssumeRole)",
        );
    }
    error
}

/// The tags of a session, as the SDK takes them.
fn session_tags(tags: &[SessionTag]) -> Vec<Tag> {
    tags.iter().filter_map(|tag| Tag::builder().key(tag.key).value(&tag.value).build().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_stss_own_failures_are_retried_and_refusals_are_final() {
        assert_eq!(classify(Some("Throttling"), Some(400)), Failure::Throttled, "STS's query protocol");
        assert_eq!(classify(Some("RequestLimitExceeded"), Some(400)), Failure::Throttled);
        assert_eq!(classify(None, Some(429)), Failure::Throttled);
        assert_eq!(classify(Some("InternalFailure"), Some(500)), Failure::Transient);
        assert_eq!(classify(None, Some(503)), Failure::Transient);
        assert_eq!(classify(Some("IDPCommunicationError"), Some(400)), Failure::Transient);
        for code in [
            "AccessDenied",
            "MalformedPolicyDocument",
            "PackedPolicyTooLarge",
            "RegionDisabledException",
            "ExpiredToken",
            "ValidationError",
            "InvalidClientTokenId",
        ] {
            assert_eq!(classify(Some(code), Some(403)), Failure::Final, "{code}");
        }
        assert!(!Failure::Final.is_retryable() && Failure::Throttled.is_retryable());
        assert!(StsError::transient("timed out").failure.is_retryable());
        assert!(!StsError::other("the pod is gone").failure.is_retryable());
    }

    #[test]
    fn regional_flag_selects_the_endpoint() {
        assert_eq!(global_endpoint(false, false, Some("eu-west-1")), Some(("https://sts.amazonaws.com", "us-east-1")));
        assert_eq!(global_endpoint(true, false, Some("eu-west-1")), None, "the SDK's regional default");
        assert_eq!(global_endpoint(false, true, Some("eu-west-1")), None, "an explicit endpoint wins");
        assert_eq!(global_endpoint(false, false, Some("cn-north-1")), None, "no global endpoint in China");
        assert_eq!(global_endpoint(false, false, Some("us-gov-west-1")), None);
    }
}
