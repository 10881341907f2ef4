//! The HTTP side: routing of Kubernetes API paths to the store, chunked watch responses, and
//! the listener that can be taken away and brought back at the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::access_review::Rules;
use crate::conversion;
use crate::error::ApiError;
use crate::resources::{self, ResourceType};
use crate::selector::Selector;
use crate::store::{ListRequest, Store, WatchRequest};
use crate::token_review::Tokens;

type Body = BoxBody<Bytes, Infallible>;

/// Whether one accept loop's connections may still answer: cleared when an outage begins, and
/// checked before every request, so the outage is in force the moment it begins.
#[derive(Clone, Debug)]
pub(crate) struct Serving(Arc<std::sync::atomic::AtomicBool>);

impl Default for Serving {
    fn default() -> Self {
        Serving(Arc::new(std::sync::atomic::AtomicBool::new(true)))
    }
}

impl Serving {
    pub(crate) fn stop(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_on(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Accepts connections until the task is aborted; aborting it also drops every open connection
/// (the JoinSet aborts its tasks when dropped), which is what an outage looks like to a client.
/// A request that reaches a connection after [`Serving::stop`] is not answered: the connection
/// closes, as it would if the server had died.
pub(crate) async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    tokens: Arc<Tokens>,
    rules: Arc<Rules>,
    serving: Serving,
) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!("fake API server accept failed: {e}");
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let store = Arc::clone(&store);
        let tokens = Arc::clone(&tokens);
        let rules = Arc::clone(&rules);
        let serving = serving.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let store = Arc::clone(&store);
                let tokens = Arc::clone(&tokens);
                let rules = Arc::clone(&rules);
                let on = serving.is_on();
                async move {
                    if !on {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the fake API server is in an outage",
                        ));
                    }
                    Ok(handle(&store, &tokens, &rules, req).await)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub(crate) fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

async fn handle(
    store: &Store,
    tokens: &Tokens,
    rules: &Rules,
    req: Request<Incoming>,
) -> Response<Body> {
    let result = if req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews" {
        token_review(tokens, req).await
    } else if req.uri().path() == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
        access_review(rules, req).await
    } else {
        route(store, req).await
    };
    match result {
        Ok(resp) => resp,
        Err(e) => json_response(
            StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &e.to_status(),
        ),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    resp
}

/// TokenReview: create only, answered from the issued tokens.
async fn token_review(tokens: &Tokens, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "{} is not supported on tokenreviews (create only)",
                req.method()
            ),
        ));
    }
    let review = tokens.review(read_json(req).await?)?;
    Ok(json_response(StatusCode::CREATED, &review))
}

/// SubjectAccessReview: create only, answered from the granted rules.
async fn access_review(rules: &Rules, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "{} is not supported on subjectaccessreviews (create only)",
                req.method()
            ),
        ));
    }
    let review = rules.review(read_json(req).await?)?;
    Ok(json_response(StatusCode::CREATED, &review))
}

/// The path of a resource request, split into its parts.
struct ResourcePath {
    resource: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

async fn route(store: &Store, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let types = store.types();
    // Discovery documents.
    match segments.as_slice() {
        ["version"] => {
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-trellis-fake", "platform": "linux/amd64"}),
            ));
        }
        ["api"] => return Ok(json_response(StatusCode::OK, &resources::core_versions())),
        ["apis"] => {
            return Ok(json_response(
                StatusCode::OK,
                &resources::group_list(&types),
            ));
        }
        ["api", version] => return discovery(&types, "", version),
        ["apis", group, version] => return discovery(&types, group, version),
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let resource = store
        .resource(group, version, plural)
        .filter(|t| t.namespaced || namespace.is_none())
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            )
        })?;
    let target = ResourcePath {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    };
    let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let method = req.method().clone();
    // A CRD version other than its storage version: stored converted (conversion.rs).
    let conversion = conversion::lookup(store, &target.resource);
    let stored = conversion.as_ref().map_or(&target.resource, |c| &c.storage);
    match (method, &target.name) {
        (Method::GET, None) if param("watch").is_some_and(|w| w == "true" || w == "1") => {
            if let Some(conversion) = &conversion {
                return Err(ApiError::bad_request(format!(
                    "the fake API server watches {} only at its storage version {} (a simplification: see conversion.rs)",
                    target.resource.plural,
                    conversion.storage.api_version()
                )));
            }
            watch(store, &target, &param)
        }
        (Method::GET, None) => {
            let list = ListRequest {
                namespace: target.namespace.clone(),
                labels: Selector::parse_labels(&param("labelSelector").unwrap_or_default())?,
                fields: Selector::parse_fields(&param("fieldSelector").unwrap_or_default())?,
                limit: param("limit")
                    .map(|l| {
                        l.parse()
                            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))
                    })
                    .transpose()?,
                continue_token: param("continue").filter(|c| !c.is_empty()),
                resource_version: param("resourceVersion"),
                exact: param("resourceVersionMatch").as_deref() == Some("Exact"),
            };
            let mut list = store.list(stored, &list)?;
            if let Some(conversion) = &conversion {
                let items = match list.get_mut("items") {
                    Some(Value::Array(items)) => std::mem::take(items),
                    _ => Vec::new(),
                };
                list["items"] =
                    Value::Array(conversion.convert(items, &conversion.requested).await?);
                list["apiVersion"] = Value::String(conversion.requested.clone());
            }
            Ok(json_response(StatusCode::OK, &list))
        }
        (Method::GET, Some(name)) => {
            let obj = store.get(stored, target.namespace.as_deref().unwrap_or(""), name)?;
            let obj = out(conversion.as_ref(), obj).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::POST, None) => {
            let body = into(conversion.as_ref(), read_json(req).await?).await?;
            let obj = store.create(stored, target.namespace.as_deref(), body)?;
            let obj = out(conversion.as_ref(), obj).await?;
            Ok(json_response(StatusCode::CREATED, &obj))
        }
        (Method::PUT, Some(name)) => {
            let name = name.clone();
            let body = into(conversion.as_ref(), read_json(req).await?).await?;
            let obj = store.replace(stored, target.namespace.as_deref(), &name, body)?;
            let obj = out(conversion.as_ref(), obj).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::PATCH, Some(name)) => {
            let name = name.clone();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if !content_type.contains("merge-patch") {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the fake API server supports merge and strategic-merge patches, not {content_type:?}"
                    ),
                ));
            }
            let body = read_json(req).await?;
            let obj = match &conversion {
                None => store.patch(stored, target.namespace.as_deref(), &name, &body)?,
                Some(conversion) => {
                    // Patched at the version the client speaks, as the real server does.
                    let current =
                        store.get(stored, target.namespace.as_deref().unwrap_or(""), &name)?;
                    let mut object = conversion.one(current, &conversion.requested).await?;
                    crate::store::merge_patch(&mut object, &body);
                    let object = conversion
                        .one(object, &conversion.storage.api_version())
                        .await?;
                    let stored_object =
                        store.replace(stored, target.namespace.as_deref(), &name, object)?;
                    conversion.one(stored_object, &conversion.requested).await?
                }
            };
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::DELETE, Some(name)) => {
            let obj = store.delete(stored, target.namespace.as_deref(), name)?;
            let obj = out(conversion.as_ref(), obj).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    }
}

/// A stored object as the client asked for it.
async fn out(
    conversion: Option<&conversion::Conversion>,
    object: Value,
) -> Result<Value, ApiError> {
    match conversion {
        Some(conversion) => conversion.one(object, &conversion.requested).await,
        None => Ok(object),
    }
}

/// A client's object as it is stored. Its apiVersion must be the one of the URL (else 400, as
/// the real server answers).
async fn into(
    conversion: Option<&conversion::Conversion>,
    object: Value,
) -> Result<Value, ApiError> {
    let Some(conversion) = conversion else {
        return Ok(object);
    };
    let sent = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if sent != conversion.requested {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({sent}) does not match the expected API version ({})",
            conversion.requested
        )));
    }
    conversion
        .one(object, &conversion.storage.api_version())
        .await
}

fn discovery(
    types: &[ResourceType],
    group: &str,
    version: &str,
) -> Result<Response<Body>, ApiError> {
    resources::resource_list(types, group, version)
        .map(|doc| json_response(StatusCode::OK, &doc))
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("no resources registered in {group}/{version}"),
            )
        })
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
}

/// A chunked response of JSON lines that ends after `timeoutSeconds` (or when the store closes
/// the watch).
fn watch(
    store: &Store,
    target: &ResourcePath,
    param: &dyn Fn(&str) -> Option<String>,
) -> Result<Response<Body>, ApiError> {
    let request = WatchRequest {
        namespace: target.namespace.clone(),
        labels: Selector::parse_labels(&param("labelSelector").unwrap_or_default())?,
        fields: Selector::parse_fields(&param("fieldSelector").unwrap_or_default())?,
        resource_version: param("resourceVersion"),
        bookmarks: param("allowWatchBookmarks").is_some_and(|b| b == "true"),
        send_initial_events: param("sendInitialEvents").is_some_and(|b| b == "true"),
    };
    let timeout = match param("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        // A real server picks a random 30..60 minutes; one hour is close enough for tests.
        None => Duration::from_secs(3600),
    };
    let rx = store.watch(&target.resource, request)?;
    let deadline = tokio::time::sleep(timeout);
    let lines = tokio_stream_from(rx)
        .take_until(deadline)
        .map(|line| Ok::<_, Infallible>(Frame::data(line)));
    let body: Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync>> =
        Box::pin(lines);
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(body)));
    resp.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    Ok(resp)
}

/// An unbounded receiver as a stream.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + Sync {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
