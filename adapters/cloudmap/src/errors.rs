//! SDK errors to [`DiscoveryError`]s: which are "the service does not exist" (an answer, not an
//! error), which are temporary (throttling, network, 5xx) and which need a person (credentials,
//! configuration).

use aws_sdk_servicediscovery::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use trellis_discovery::{DiscoveryError, ErrorKind, SourceId};

/// What a failed call means to a watch.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Cloud Map said the namespace or service does not exist.
    NotFound,
    Error(DiscoveryError),
}

/// Error codes AWS uses for throttling (Cloud Map says `RequestLimitExceeded`).
const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
];

/// Error codes for credentials the service refused.
const UNAUTHORIZED: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "ExpiredToken",
    "MissingAuthenticationToken",
];

/// The kind and temporariness of a service error `code` with HTTP `status`.
pub(crate) fn classify_code(code: Option<&str>, status: u16) -> (ErrorKind, bool) {
    match code {
        Some(c) if THROTTLING.contains(&c) => (ErrorKind::Unavailable, true),
        Some(c) if UNAUTHORIZED.contains(&c) => (ErrorKind::Unauthorized, false),
        Some("InvalidInput") => (ErrorKind::Config, false),
        _ if status == 429 || status >= 500 => (ErrorKind::Unavailable, true),
        _ if status == 401 || status == 403 => (ErrorKind::Unauthorized, false),
        _ => (ErrorKind::Other, false),
    }
}

/// Turns the SDK error of `operation` (done for `what`, e.g. a service key) into a [`Failure`].
pub(crate) fn failure<E, R>(
    source: &SourceId,
    operation: &str,
    what: &str,
    err: SdkError<E, R>,
) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
    SdkError<E, R>: ServiceStatus,
{
    let (kind, temporary) = match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code();
            if matches!(code, Some("NamespaceNotFound" | "ServiceNotFound")) {
                return Failure::NotFound;
            }
            classify_code(code, err.status().unwrap_or(0))
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => (ErrorKind::Unavailable, true),
        SdkError::ResponseError(_) => (ErrorKind::InvalidData, true),
        SdkError::ConstructionFailure(_) => (ErrorKind::Config, false),
        _ => (ErrorKind::Other, true),
    };
    let message = format!("{operation} for {what}: {}", DisplayErrorContext(&err));
    Failure::Error(DiscoveryError::new(kind, temporary, source.clone(), message).with_cause(err))
}

/// The HTTP status of a service error's response, where there is one.
pub(crate) trait ServiceStatus {
    fn status(&self) -> Option<u16>;
}

impl<E> ServiceStatus for SdkError<E, aws_smithy_runtime_api::client::orchestrator::HttpResponse> {
    fn status(&self) -> Option<u16> {
        self.raw_response().map(|r| r.status().as_u16())
    }
}

impl Failure {
    /// For calls where "not found" is itself an error (the catalog's listing calls).
    pub(crate) fn into_error(self, source: &SourceId, what: &str) -> DiscoveryError {
        match self {
            Failure::Error(e) => e,
            Failure::NotFound => DiscoveryError::new(
                ErrorKind::Other,
                true,
                source.clone(),
                format!("{what}: not found"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_temporary_and_unavailable() {
        assert_eq!(
            classify_code(Some("RequestLimitExceeded"), 400),
            (ErrorKind::Unavailable, true)
        );
        assert_eq!(
            classify_code(Some("ThrottlingException"), 400),
            (ErrorKind::Unavailable, true)
        );
        assert_eq!(classify_code(None, 429), (ErrorKind::Unavailable, true));
        assert_eq!(
            classify_code(Some("InternalFailure"), 500),
            (ErrorKind::Unavailable, true)
        );
    }

    #[test]
    fn refused_credentials_are_permanent() {
        assert_eq!(
            classify_code(Some("UnrecognizedClientException"), 400),
            (ErrorKind::Unauthorized, false)
        );
        assert_eq!(classify_code(None, 403), (ErrorKind::Unauthorized, false));
        assert_eq!(
            classify_code(Some("InvalidInput"), 400),
            (ErrorKind::Config, false)
        );
    }
}
