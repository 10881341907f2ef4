//! Parsing a request's path and query into what it asks for, and the window.
//!
//! Names and namespaces are checked to be Kubernetes names (letters, digits, `-`, `.`, `_`)
//! before they go into PromQL, so no request can change a query's shape.

use std::time::Duration;

use http::StatusCode;

use crate::{Answer, PREFIX};

/// The kinds the API answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pods,
    Deployments,
    StatefulSets,
    DaemonSets,
    Namespaces,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pods,
        Kind::Deployments,
        Kind::StatefulSets,
        Kind::DaemonSets,
        Kind::Namespaces,
    ];

    /// The resource name in URLs (and in a SubjectAccessReview).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Deployments => "deployments",
            Kind::StatefulSets => "statefulsets",
            Kind::DaemonSets => "daemonsets",
            Kind::Namespaces => "namespaces",
        }
    }

    /// The Kubernetes kind.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Deployments => "Deployment",
            Kind::StatefulSets => "StatefulSet",
            Kind::DaemonSets => "DaemonSet",
            Kind::Namespaces => "Namespace",
        }
    }

    /// The proxies' `*_kind` label value of workloads of this kind.
    pub fn workload_kind(self) -> Option<&'static str> {
        match self {
            Kind::Deployments => Some("deployment"),
            Kind::StatefulSets => Some("statefulset"),
            Kind::DaemonSets => Some("daemonset"),
            Kind::Pods | Kind::Namespaces => None,
        }
    }

    fn from_plural(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == text)
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `/apis`
    GroupList,
    /// `/apis/metrics.smi-spec.io`
    Group,
    /// `/apis/metrics.smi-spec.io/v1alpha1`
    Discovery,
    /// One object (a namespace has no namespace).
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
    /// Every object of a kind, in a namespace or all.
    List {
        kind: Kind,
        namespace: Option<String>,
    },
    /// An object's edges.
    Edges {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
}

/// The window of every value: whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window(pub Duration);

impl Window {
    pub const DEFAULT: Window = Window(Duration::from_secs(30));
    pub const MIN: Duration = Duration::from_secs(5);
    pub const MAX: Duration = Duration::from_secs(3600);

    /// `30s`, `2m`, `1h`, `1m30s` (a Go duration of whole seconds) within [`Self::MIN`] and
    /// [`Self::MAX`].
    pub fn parse(text: &str) -> Result<Window, String> {
        let mut seconds = 0u64;
        let mut number = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => return Err(format!("window {text:?}: expected e.g. 30s, 5m or 1h")),
            };
            let n: u64 = number
                .parse()
                .map_err(|_| format!("window {text:?}: expected e.g. 30s, 5m or 1h"))?;
            seconds = seconds.saturating_add(n.saturating_mul(unit));
            number.clear();
        }
        if !number.is_empty() || text.is_empty() {
            return Err(format!(
                "window {text:?}: expected e.g. 30s, 5m or 1h (with its unit)"
            ));
        }
        let d = Duration::from_secs(seconds);
        if d < Self::MIN || d > Self::MAX {
            return Err(format!(
                "window {text:?}: must be between {}s and {}s",
                Self::MIN.as_secs(),
                Self::MAX.as_secs()
            ));
        }
        Ok(Window(d))
    }

    /// As PromQL and as the objects' `window`: seconds (`30s`), which Go's
    /// `time.ParseDuration` reads too.
    pub fn promql(&self) -> String {
        format!("{}s", self.0.as_secs())
    }

    /// The objects' `window` field.
    pub fn text(&self) -> String {
        self.promql()
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub target: Target,
    pub window: Window,
}

impl Request {
    /// Parses `path` and its `query` (`window=`; others are ignored, as `kubectl` may send
    /// some); the error is the answer to give.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Request, Answer> {
        let mut window = Window::DEFAULT;
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if key == "window" {
                window = Window::parse(&value)
                    .map_err(|why| Answer::status(StatusCode::BAD_REQUEST, "BadRequest", why))?;
            }
        }
        let target = target(path)?;
        Ok(Request { target, window })
    }

    /// What a SubjectAccessReview asks about it: verb (`get`/`list`) and resource (the kind's
    /// plural); `None` for discovery, which every authenticated user may read.
    pub fn access(&self) -> Option<(&'static str, Kind, Option<&str>)> {
        match &self.target {
            Target::Object {
                kind, namespace, ..
            }
            | Target::Edges {
                kind, namespace, ..
            } => Some(("get", *kind, namespace.as_deref())),
            Target::List { kind, namespace } => Some(("list", *kind, namespace.as_deref())),
            Target::GroupList | Target::Group | Target::Discovery => None,
        }
    }

    /// The object's name, for a SubjectAccessReview.
    pub fn name(&self) -> Option<&str> {
        match &self.target {
            Target::Object { name, .. } | Target::Edges { name, .. } => Some(name),
            _ => None,
        }
    }
}

fn not_found(path: &str) -> Answer {
    Answer::status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "the server could not find the requested resource {path}: the TrafficMetrics API serves {PREFIX}/namespaces/NS/KIND[/NAME[/edges]], {PREFIX}/KIND and {PREFIX}/namespaces[/NAME[/edges]] for KIND pods, deployments, statefulsets, daemonsets"
        ),
    )
}

fn name(path: &str, text: &str) -> Result<String, Answer> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(Answer::status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("{path}: {text:?} is not a Kubernetes name"),
        ))
    }
}

fn target(path: &str) -> Result<Target, Answer> {
    match path.trim_end_matches('/') {
        "/apis" => return Ok(Target::GroupList),
        "/apis/metrics.smi-spec.io" => return Ok(Target::Group),
        _ => {}
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Err(not_found(path));
    };
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let kind = |text: &str| Kind::from_plural(text).ok_or_else(|| not_found(path));
    let namespaced = |kind: Kind| {
        if kind == Kind::Namespaces {
            Err(not_found(path))
        } else {
            Ok(kind)
        }
    };
    Ok(match parts.as_slice() {
        [] => Target::Discovery,
        ["namespaces"] => Target::List {
            kind: Kind::Namespaces,
            namespace: None,
        },
        ["namespaces", ns] => Target::Object {
            kind: Kind::Namespaces,
            namespace: None,
            name: name(path, ns)?,
        },
        ["namespaces", ns, "edges"] => Target::Edges {
            kind: Kind::Namespaces,
            namespace: None,
            name: name(path, ns)?,
        },
        ["namespaces", ns, k] => Target::List {
            kind: namespaced(kind(k)?)?,
            namespace: Some(name(path, ns)?),
        },
        ["namespaces", ns, k, n] => Target::Object {
            kind: namespaced(kind(k)?)?,
            namespace: Some(name(path, ns)?),
            name: name(path, n)?,
        },
        ["namespaces", ns, k, n, "edges"] => Target::Edges {
            kind: namespaced(kind(k)?)?,
            namespace: Some(name(path, ns)?),
            name: name(path, n)?,
        },
        [k] => Target::List {
            kind: kind(k)?,
            namespace: None,
        },
        _ => return Err(not_found(path)),
    })
}
