//! TrafficSplit: every version to and from [`model::TrafficSplit`].

use super::ConvertError;
use super::annotations::{self, SPLIT_MATCHES, SPLIT_WEIGHTS};
use crate::api::quantity::{IntWeight, Quantity};
use crate::api::split::{
    self, Backend, RouteGroupKind, RouteGroupRef, v1alpha1, v1alpha2, v1alpha3, v1alpha4,
};
use crate::model::{self, SplitBackend, Weight};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub(super) fn from_v1alpha1(
    o: &v1alpha1::TrafficSplit,
) -> Result<model::TrafficSplit, ConvertError> {
    let mut metadata = o.metadata.clone();
    let matches = take_matches(&mut metadata)?;
    let backends = o
        .spec
        .backends
        .iter()
        .map(|b| SplitBackend {
            service: b.service.clone(),
            weight: Weight(b.weight.milli()),
        })
        .collect();
    Ok(model::TrafficSplit {
        metadata,
        service: o.spec.service.clone(),
        backends,
        matches,
    })
}

pub(super) fn from_v1alpha2(
    o: &v1alpha2::TrafficSplit,
) -> Result<model::TrafficSplit, ConvertError> {
    let mut metadata = o.metadata.clone();
    let matches = take_matches(&mut metadata)?;
    let backends = int_backends_to_model(&mut metadata, &o.spec.backends)?;
    Ok(model::TrafficSplit {
        metadata,
        service: o.spec.service.clone(),
        backends,
        matches,
    })
}

pub(super) fn from_v1alpha3(
    o: &v1alpha3::TrafficSplit,
) -> Result<model::TrafficSplit, ConvertError> {
    from_matched(
        &o.metadata,
        &o.spec.service,
        &o.spec.backends,
        &o.spec.matches,
    )
}

pub(super) fn from_v1alpha4(
    o: &v1alpha4::TrafficSplit,
) -> Result<model::TrafficSplit, ConvertError> {
    from_matched(
        &o.metadata,
        &o.spec.service,
        &o.spec.backends,
        &o.spec.matches,
    )
}

fn from_matched(
    metadata: &ObjectMeta,
    service: &str,
    backends: &[Backend],
    matches: &[RouteGroupRef],
) -> Result<model::TrafficSplit, ConvertError> {
    let mut metadata = metadata.clone();
    let backends = int_backends_to_model(&mut metadata, backends)?;
    let matches = matches
        .iter()
        .map(|m| model::RouteGroupRef {
            name: m.name.clone(),
        })
        .collect();
    Ok(model::TrafficSplit {
        metadata,
        service: service.to_owned(),
        backends,
        matches,
    })
}

pub(super) fn to_v1alpha1(m: &model::TrafficSplit) -> v1alpha1::TrafficSplit {
    let mut metadata = m.metadata.clone();
    put_matches(&mut metadata, &m.matches);
    let backends = m
        .backends
        .iter()
        .map(|b| v1alpha1::QuantityBackend {
            service: b.service.clone(),
            weight: Quantity::from_milli(b.weight.milli()),
        })
        .collect();
    let mut o = v1alpha1::TrafficSplit::new(
        "",
        v1alpha1::TrafficSplitSpec {
            service: m.service.clone(),
            backends,
        },
    );
    o.metadata = metadata;
    o
}

pub(super) fn to_v1alpha2(m: &model::TrafficSplit) -> v1alpha2::TrafficSplit {
    let mut metadata = m.metadata.clone();
    put_matches(&mut metadata, &m.matches);
    let backends = int_backends_from_model(&mut metadata, &m.backends);
    let mut o = v1alpha2::TrafficSplit::new(
        "",
        v1alpha2::TrafficSplitSpec {
            service: m.service.clone(),
            backends,
        },
    );
    o.metadata = metadata;
    o
}

pub(super) fn to_v1alpha3(m: &model::TrafficSplit) -> v1alpha3::TrafficSplit {
    let mut metadata = m.metadata.clone();
    let backends = int_backends_from_model(&mut metadata, &m.backends);
    let spec = v1alpha3::TrafficSplitSpec {
        service: m.service.clone(),
        matches: wire_matches(&m.matches),
        backends,
    };
    let mut o = v1alpha3::TrafficSplit::new("", spec);
    o.metadata = metadata;
    o
}

pub(super) fn to_v1alpha4(m: &model::TrafficSplit) -> v1alpha4::TrafficSplit {
    let mut metadata = m.metadata.clone();
    let backends = int_backends_from_model(&mut metadata, &m.backends);
    let spec = v1alpha4::TrafficSplitSpec {
        service: m.service.clone(),
        matches: wire_matches(&m.matches),
        backends,
    };
    let mut o = v1alpha4::TrafficSplit::new("", spec);
    o.metadata = metadata;
    o
}

fn wire_matches(matches: &[model::RouteGroupRef]) -> Vec<RouteGroupRef> {
    matches
        .iter()
        .map(|m| RouteGroupRef {
            kind: RouteGroupKind::HttpRouteGroup,
            name: m.name.clone(),
        })
        .collect()
}

fn take_matches(metadata: &mut ObjectMeta) -> Result<Vec<model::RouteGroupRef>, ConvertError> {
    let matches: Option<Vec<split::RouteGroupRef>> = annotations::take(metadata, SPLIT_MATCHES)?;
    Ok(matches
        .unwrap_or_default()
        .into_iter()
        .map(|m| model::RouteGroupRef { name: m.name })
        .collect())
}

fn put_matches(metadata: &mut ObjectMeta, matches: &[model::RouteGroupRef]) {
    if !matches.is_empty() {
        annotations::put(metadata, SPLIT_MATCHES, &wire_matches(matches));
    }
}

/// Integer weights into milli-units, preferring the exact quantities of the weights annotation
/// when it still describes these integers (same count, same ratio).
fn int_backends_to_model(
    metadata: &mut ObjectMeta,
    backends: &[Backend],
) -> Result<Vec<SplitBackend>, ConvertError> {
    let exact: Option<Vec<Quantity>> = annotations::take(metadata, SPLIT_WEIGHTS)?;
    let integers: Vec<u64> = backends.iter().map(|b| b.weight.0).collect();
    let milli: Vec<u64> = match exact {
        Some(exact) if exact.len() == integers.len() && proportional(&exact, &integers) => {
            exact.iter().map(|q| q.milli()).collect()
        }
        _ => integers.iter().map(|w| w * 1000).collect(),
    };
    Ok(backends
        .iter()
        .zip(milli)
        .map(|(b, milli)| SplitBackend {
            service: b.service.clone(),
            weight: Weight(milli),
        })
        .collect())
}

fn proportional(exact: &[Quantity], integers: &[u64]) -> bool {
    // a_i / a_j == w_i / w_j for all pairs  <=>  a_i * w_j == a_j * w_i (checked against the first
    // non-zero pair; zeros must line up).
    let Some(pivot) = integers.iter().position(|w| *w != 0) else {
        return exact.iter().all(|q| q.milli() == 0);
    };
    let (a_p, w_p) = (exact[pivot].milli() as u128, integers[pivot] as u128);
    a_p != 0
        && exact
            .iter()
            .zip(integers)
            .all(|(a, w)| a.milli() as u128 * w_p == a_p * *w as u128)
}

/// Milli-unit weights as integers: whole units when all are whole, otherwise the smallest
/// integers with the same ratio plus the exact quantities in the weights annotation.
fn int_backends_from_model(metadata: &mut ObjectMeta, backends: &[SplitBackend]) -> Vec<Backend> {
    let all_whole = backends
        .iter()
        .all(|b| b.weight.milli().is_multiple_of(1000));
    let divisor = if all_whole {
        1000
    } else {
        let exact: Vec<Quantity> = backends
            .iter()
            .map(|b| Quantity::from_milli(b.weight.milli()))
            .collect();
        annotations::put(metadata, SPLIT_WEIGHTS, &exact);
        backends.iter().fold(0, |g, b| gcd(g, b.weight.milli()))
    };
    backends
        .iter()
        .map(|b| Backend {
            service: b.service.clone(),
            weight: IntWeight(b.weight.milli() / divisor),
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_weights_become_a_ratio_and_come_back_exactly() {
        let model = model::TrafficSplit {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            service: "web".into(),
            backends: vec![
                SplitBackend {
                    service: "a".into(),
                    weight: Weight(500),
                },
                SplitBackend {
                    service: "b".into(),
                    weight: Weight(1000),
                },
            ],
            matches: vec![],
        };
        let v4 = to_v1alpha4(&model);
        let weights: Vec<u64> = v4.spec.backends.iter().map(|b| b.weight.0).collect();
        assert_eq!(weights, [1, 2]);
        assert_eq!(from_v1alpha4(&v4).unwrap(), model);
    }

    #[test]
    fn stale_weight_annotation_is_ignored() {
        let mut metadata = ObjectMeta::default();
        annotations::put(
            &mut metadata,
            SPLIT_WEIGHTS,
            &vec![Quantity::from_milli(500), Quantity::from_milli(1000)],
        );
        let backends = vec![
            Backend {
                service: "a".into(),
                weight: IntWeight(3),
            },
            Backend {
                service: "b".into(),
                weight: IntWeight(1),
            },
        ];
        let model = int_backends_to_model(&mut metadata, &backends).unwrap();
        assert_eq!(model[0].weight, Weight(3000));
        assert!(metadata.annotations.is_none(), "the annotation is consumed");
    }
}
