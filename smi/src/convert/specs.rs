//! HTTPRouteGroup, TCPRoute and UDPRoute: every version to and from the model.

use super::ConvertError;
use super::annotations::{self, SPECS_HEADERS, SPECS_PORTS};
use crate::api::headers::{HeaderMatch, HeaderMatches};
use crate::api::specs::{
    HttpMatch, HttpMatchNoHeaders, PortMatches, http_route_group as htr, tcp_route as tcp,
    udp_route as udp,
};
use crate::model::{self, PortRoute};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// The headers annotation: match name to its header list (list wire form).
type HeadersByMatch = BTreeMap<String, HeaderMatches>;

pub(super) fn htr_from_v1alpha1(
    o: &htr::v1alpha1::HTTPRouteGroup,
) -> Result<model::HttpRouteGroup, ConvertError> {
    let mut metadata = o.metadata.clone();
    let mut headers: HeadersByMatch =
        annotations::take(&mut metadata, SPECS_HEADERS)?.unwrap_or_default();
    let matches = o
        .spec
        .matches
        .iter()
        .map(|m| model::HttpMatch {
            name: m.name.clone(),
            path_regex: m.path_regex.clone(),
            methods: m.methods.clone(),
            // Entries for names no longer present are stale and dropped.
            headers: headers.remove(&m.name).map(|h| h.0).unwrap_or_default(),
        })
        .collect();
    Ok(model::HttpRouteGroup { metadata, matches })
}

pub(super) fn htr_from_matches(
    metadata: &ObjectMeta,
    matches: &[HttpMatch],
) -> model::HttpRouteGroup {
    model::HttpRouteGroup {
        metadata: metadata.clone(),
        matches: matches
            .iter()
            .map(|m| model::HttpMatch {
                name: m.name.clone(),
                path_regex: m.path_regex.clone(),
                methods: m.methods.clone(),
                headers: m.headers.0.clone(),
            })
            .collect(),
    }
}

pub(super) fn htr_to_v1alpha1(m: &model::HttpRouteGroup) -> htr::v1alpha1::HTTPRouteGroup {
    let mut metadata = m.metadata.clone();
    let headers: HeadersByMatch = m
        .matches
        .iter()
        .filter(|h| !h.headers.is_empty())
        .map(|h| (h.name.clone(), HeaderMatches(h.headers.clone())))
        .collect();
    if !headers.is_empty() {
        annotations::put(&mut metadata, SPECS_HEADERS, &headers);
    }
    let matches = m
        .matches
        .iter()
        .map(|h| HttpMatchNoHeaders {
            name: h.name.clone(),
            path_regex: h.path_regex.clone(),
            methods: h.methods.clone(),
        })
        .collect();
    let mut o =
        htr::v1alpha1::HTTPRouteGroup::new("", htr::v1alpha1::HTTPRouteGroupSpec { matches });
    o.metadata = metadata;
    o
}

pub(super) fn wire_http_matches(m: &model::HttpRouteGroup) -> Vec<HttpMatch> {
    m.matches
        .iter()
        .map(|h| HttpMatch {
            name: h.name.clone(),
            path_regex: h.path_regex.clone(),
            methods: h.methods.clone(),
            headers: HeaderMatches(
                h.headers
                    .iter()
                    .map(|x| HeaderMatch {
                        name: x.name.clone(),
                        value: x.value.clone(),
                    })
                    .collect(),
            ),
        })
        .collect()
}

macro_rules! htr_to {
    ($name:ident, $version:ident) => {
        pub(super) fn $name(m: &model::HttpRouteGroup) -> htr::$version::HTTPRouteGroup {
            let spec = htr::$version::HTTPRouteGroupSpec {
                matches: wire_http_matches(m),
            };
            let mut o = htr::$version::HTTPRouteGroup::new("", spec);
            o.metadata = m.metadata.clone();
            o
        }
    };
}
htr_to!(htr_to_v1alpha2, v1alpha2);
htr_to!(htr_to_v1alpha3, v1alpha3);
htr_to!(htr_to_v1alpha4, v1alpha4);

/// TCPRoute v1alpha1..v1alpha3 hold no ports: they come from the ports annotation.
pub(super) fn tcp_from_portless(metadata: &ObjectMeta) -> Result<PortRoute, ConvertError> {
    let mut metadata = metadata.clone();
    let ports: Option<Vec<u16>> = annotations::take(&mut metadata, SPECS_PORTS)?;
    Ok(PortRoute {
        metadata,
        ports: ports.unwrap_or_default(),
    })
}

macro_rules! tcp_to_portless {
    ($name:ident, $version:ident) => {
        pub(super) fn $name(m: &PortRoute) -> tcp::$version::TCPRoute {
            let mut metadata = m.metadata.clone();
            if !m.ports.is_empty() {
                annotations::put(&mut metadata, SPECS_PORTS, &m.ports);
            }
            let mut o = tcp::$version::TCPRoute::new("", tcp::$version::TCPRouteSpec {});
            o.metadata = metadata;
            o
        }
    };
}
tcp_to_portless!(tcp_to_v1alpha1, v1alpha1);
tcp_to_portless!(tcp_to_v1alpha2, v1alpha2);
tcp_to_portless!(tcp_to_v1alpha3, v1alpha3);

pub(super) fn port_route(metadata: &ObjectMeta, matches: &PortMatches) -> PortRoute {
    PortRoute {
        metadata: metadata.clone(),
        ports: matches.ports.clone(),
    }
}

pub(super) fn tcp_to_v1alpha4(m: &PortRoute) -> tcp::v1alpha4::TCPRoute {
    let spec = tcp::v1alpha4::TCPRouteSpec {
        matches: PortMatches {
            ports: m.ports.clone(),
        },
    };
    let mut o = tcp::v1alpha4::TCPRoute::new("", spec);
    o.metadata = m.metadata.clone();
    o
}

pub(super) fn udp_to_v1alpha4(m: &PortRoute) -> udp::v1alpha4::UDPRoute {
    let spec = udp::v1alpha4::UDPRouteSpec {
        matches: PortMatches {
            ports: m.ports.clone(),
        },
    };
    let mut o = udp::v1alpha4::UDPRoute::new("", spec);
    o.metadata = m.metadata.clone();
    o
}
