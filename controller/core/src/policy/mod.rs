//! Policy sources: where the controller's policy comes from (the SMI kinds and Trellis's
//! TrafficPolicy and ExternalService, all as `trellis_smi::model::Policy`).
//!
//! A [`PolicySource`] yields the whole [`PolicySet`] it holds now, then a new whole set after
//! each change. Sources never drop policy in force because of bad input: a bad new version of a
//! resource is reported as a [`PolicyProblem`] and the last good version stays in `policies`.
//! The index merges the sets of every source (see `crate::index`).
//!
//! Every resource comes with its [`Origin`] (`PolicySet::origins`): where a person finds it. The
//! index locates every problem it finds in the merged policy at the origin of the resource at
//! fault, so an operator with hundreds of files (or objects) is told which one to open.
//!
//! Sources: [`files`] (a watched directory of SMI YAML, for local mode and platforms without
//! Kubernetes) here, and the SMI CRDs through reflectors in `trellis-controller-kubernetes`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use trellis_smi::model::ResourceId;

pub mod files;

/// The whole SMI policy one source holds now. A source that sees a bad new version of a resource
/// keeps the last good version of that resource in `policies` and reports the problem: bad input
/// never removes policy in force.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// Every resource in force, in the normalized model.
    pub policies: Vec<trellis_smi::model::Policy>,
    /// Where each resource of `policies` came from. The index locates a resource missing here
    /// at the source's name (less precise, never silent).
    pub origins: HashMap<ResourceId, Origin>,
    /// What a user must hear about (bad documents, rejected versions).
    pub problems: Vec<PolicyProblem>,
}

/// Where a resource came from, for people and for Events: `policy/split.yaml:12` (the file and
/// the line its document starts on) or `kubernetes TrafficSplit shop/web` (the object). Shared
/// (`Arc`): a set and every view built from it hold one copy of each text.
pub type Origin = Arc<str>;

/// Something a user must hear about, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The resource concerned, e.g. `"TrafficSplit shop/web"` (or the file when no resource could be named).
    pub resource: String,
    /// Where it is: the [`Origin`] of the resource at fault (`"dir/split.yaml:12"`, `"kubernetes
    /// TrafficSplit shop/web"`), or what else failed when no resource is at fault
    /// (`"kubernetes TrafficSplit watch"`, `"discovery"`, a file that does not parse).
    pub location: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.resource, self.message)
    }
}

/// A source of SMI policy: the current whole set first, then a new whole set after each change.
/// Never ends on its own.
pub trait PolicySource: Send + Sync + 'static {
    /// A short name for reports, e.g. `"files:/etc/trellis/policy"` or `"kubernetes"`.
    fn name(&self) -> String;
    /// The current whole set, then a new whole set after each change.
    fn watch(&self) -> futures::stream::BoxStream<'static, PolicySet>;
}
