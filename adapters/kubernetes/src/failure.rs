//! Watcher failures turned into the adapter's error: what kind, whether retrying may help, and
//! which resource it concerns.

use kube::runtime::watcher;
use trellis_discovery::{DiscoveryError, ErrorKind, SourceId};

/// A reflector failure, cloneable so every open watch can report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: ErrorKind,
    pub temporary: bool,
    pub message: String,
}

impl Failure {
    pub(crate) fn to_error(&self, source: &SourceId) -> DiscoveryError {
        DiscoveryError::new(
            self.kind,
            self.temporary,
            source.clone(),
            self.message.clone(),
        )
    }
}

/// Classifies a watcher error on `resource` (`services`, `pods`, ...). `None` for 410 Gone: the
/// watcher relists on its own, which is protocol, not failure (on a real cluster it happens every
/// few minutes without bookmarks).
pub(crate) fn classify(resource: &str, err: &watcher::Error) -> Option<Failure> {
    let (kind, temporary) = match err {
        watcher::Error::WatchError(status) if status.code == 410 => return None,
        watcher::Error::WatchError(status) => by_code(status.code),
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => by_code(status.code),
            _ => (ErrorKind::Unavailable, true),
        },
        watcher::Error::NoResourceVersion => (ErrorKind::InvalidData, true),
    };
    Some(Failure {
        kind,
        temporary,
        message: format!("watching {resource}: {err}"),
    })
}

fn by_code(code: u16) -> (ErrorKind, bool) {
    match code {
        401 | 403 => (ErrorKind::Unauthorized, false),
        // The resource is not served (e.g. discovery.k8s.io/v1 missing): a cluster problem that
        // waiting alone does not fix.
        404 => (ErrorKind::Config, false),
        400 | 422 => (ErrorKind::InvalidData, false),
        _ => (ErrorKind::Unavailable, true),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn status(code: u16) -> Box<Status> {
        Box::new(Status {
            code,
            message: format!("code {code}"),
            ..Status::default()
        })
    }

    #[test]
    fn gone_is_a_resync_not_a_failure() {
        assert_eq!(
            classify("pods", &watcher::Error::WatchError(status(410))),
            None
        );
    }

    #[test]
    fn forbidden_is_unauthorized_and_permanent() {
        let err = watcher::Error::InitialListFailed(kube::Error::Api(status(403)));
        let failure = classify("pods", &err).unwrap();
        assert_eq!(
            (failure.kind, failure.temporary),
            (ErrorKind::Unauthorized, false)
        );
        assert!(
            failure.message.starts_with("watching pods: "),
            "{}",
            failure.message
        );
    }

    #[test]
    fn server_errors_are_temporary_unavailability() {
        let err = watcher::Error::WatchError(status(500));
        let failure = classify("services", &err).unwrap();
        assert_eq!(
            (failure.kind, failure.temporary),
            (ErrorKind::Unavailable, true)
        );
    }
}
