//! # trellis-smi: the Service Mesh Interface, every group and version, and Trellis's own kinds
//!
//! What Trellis knows about policy documents, with no I/O beyond reading YAML: the SMI kinds, and
//! Trellis's own `policy.trellis.io/v1alpha1` kinds: TrafficPolicy (resilience settings for a
//! Service, the settings themselves in `trellis-policy`) and ExternalService (a destination
//! outside the mesh, declared once: hosts, ports, optional TLS origination and fixed addresses,
//! and the service accounts allowed to call it). They live here, as more [`model::Kind`]s,
//! rather than in a crate of their own because they need exactly what the SMI kinds get from
//! this crate: the same loader with located errors, references to HTTPRouteGroups checked in the
//! same pass, a CRD generated beside the others, and one `Policy` type that every policy source
//! (files, Kubernetes) and the controller's index already carry. They are marked as Trellis's
//! own wherever that matters ([`model::Kind::is_smi`]: no official CRD, no conversion).
//!
//! - [`api`]: one Rust type per kind and version, exactly as on the wire — TrafficSplit
//!   v1alpha1..v1alpha4, TrafficTarget v1alpha1..v1alpha3, HTTPRouteGroup and TCPRoute
//!   v1alpha1..v1alpha4, UDPRoute v1alpha4 (all `kube::CustomResource`; the wrapper-less
//!   versions use kube's `no_spec`), the TrafficMetrics/TrafficMetricsList response types, and
//!   TrafficPolicy v1alpha1 ([`api::policy`]), ExternalService v1alpha1 ([`api::external`]).
//! - [`model`]: the normalized policy model (latest semantics) the controller consumes:
//!   [`model::TrafficSplit`] (weights exact, in milli-units), [`model::AccessPolicy`] (with the
//!   v1alpha1/2 destination port kept), [`model::HttpRouteGroup`], [`model::PortRoute`],
//!   [`model::TrafficPolicy`], [`model::ExternalService`].
//! - [`convert`]: lossless conversion between every version and the model; [`convert::convert`]
//!   is what the CRD conversion webhook calls. What a version cannot hold travels in annotations
//!   ([`convert::annotations`]), so any round trip gives back what went in.
//! - [`load`]: loading files and directories of multi-document YAML, with validation
//!   ([`validate`]) and errors that name file, line, resource and field.
//! - [`crd`]: the CRD manifests (SMI: all versions served, newest stored, webhook conversion;
//!   TrafficPolicy and ExternalService: one version each, schema derived from their types).
//!
//! ## Conversion rules (details in [`convert`])
//! | what | where a version cannot hold it |
//! |---|---|
//! | split `matches` (v1alpha1/v1alpha2) | `split.smi-spec.io/trellis-matches` |
//! | non-whole weights (integer versions) | smallest integers with the same ratio + `split.smi-spec.io/trellis-weights` |
//! | destination port (TrafficTarget v1alpha3) | `access.smi-spec.io/trellis-destination-port` |
//! | UDPRoute rules (TrafficTarget v1alpha1/v1alpha2) | left out (narrower), full list in `access.smi-spec.io/trellis-rules` |
//! | headers (HTTPRouteGroup v1alpha1) | `specs.smi-spec.io/trellis-headers` |
//! | ports (TCPRoute v1alpha1..v1alpha3) | `specs.smi-spec.io/trellis-ports` |
//!
//! Header matches are read in both wire forms (a map, or a list of single-key maps) and written
//! as the list. v1alpha1 quantity weights are written canonically (`"1000m"` becomes `"1"`).
//!
//! ## Errors
//! `file:line: Kind namespace/name: field: message`, e.g.
//! `policies/split.yaml:14: TrafficSplit default/web: spec.backends[1].weight: must be a
//! non-negative integer, got -5`. A load reports every error of every file and still returns
//! the resources that are good.
//!
//! ```
//! let report = trellis_smi::load::load_str("split.yaml", "
//! apiVersion: split.smi-spec.io/v1alpha4
//! kind: TrafficSplit
//! metadata: {name: web}
//! spec:
//!   service: web
//!   backends:
//!   - {service: web-v1, weight: 90}
//!   - {service: web-v2, weight: -5}
//! ");
//! assert_eq!(
//!     report.errors[0].to_string(),
//!     "split.yaml:9: TrafficSplit default/web: spec.backends[1].weight: must be a non-negative integer, got -5"
//! );
//! ```

pub mod api;
pub mod convert;
pub mod crd;
pub mod load;
pub mod model;
pub mod path;
pub mod validate;
pub mod yaml;
