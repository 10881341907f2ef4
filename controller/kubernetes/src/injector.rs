//! The injection webhook as the running controller serves it: [`inject::handle`] behind the
//! webhook server's [`Handler`] seam, with the options of the moment and an Event for every Pod
//! admitted without a proxy.
//!
//! The options are read at every request (`options()`): the mesh's trust anchors that injected
//! proxies get inline change when the CA rotates, and a Pod admitted after that gets the new ones.
//!
//! Why a skipped Pod's Event regards the Pod by name and namespace only: at admission the Pod
//! does not exist yet (no uid; pods of a ReplicaSet have only their `generateName`), so the Event
//! is listed by `kubectl get events -n NAMESPACE` (and `kubectl describe pod NAME` once a named
//! Pod exists) rather than attached to an object uid. Every replica may write these Events: a
//! webhook call reaches one replica, leader or not.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::inject::{self, InjectOptions, Skip};
use crate::webhook::Handler;

/// The options in force, read per request.
pub type OptionsFn = Arc<dyn Fn() -> InjectOptions + Send + Sync>;

/// `/inject` on the controller's webhook port.
pub struct Injector {
    options: OptionsFn,
    /// Where Events about skipped Pods go; `None` writes none (tests of the handler alone).
    events: Option<(Client, String)>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").finish_non_exhaustive()
    }
}

impl Injector {
    /// Serves with `options`; Events are written with `client` as `instance` (this replica).
    pub fn new(options: OptionsFn, client: Option<Client>, instance: impl Into<String>) -> Self {
        let instance = instance.into();
        Self {
            options,
            events: client.map(|client| (client, instance)),
        }
    }
}

impl Handler for Injector {
    fn path(&self) -> &str {
        inject::PATH
    }

    fn call(&self, request: Request<Incoming>) -> BoxFuture<'static, Response<Full<Bytes>>> {
        let options = (self.options)();
        let events = self.events.clone();
        Box::pin(async move {
            let (response, skipped) = inject::handle(request, &options).await;
            if let (Some(skip), Some((client, instance))) = (skipped, events) {
                // Not on the admission's path: the API server waits for our answer.
                tokio::spawn(async move {
                    if let Err(error) = write_event(&client, &instance, &skip).await {
                        tracing::warn!(
                            namespace = %skip.namespace,
                            pod = %skip.pod_name_or_generate_name,
                            "writing the Event about a pod admitted without a proxy failed: {error}"
                        );
                    }
                });
            }
            response
        })
    }
}

/// A Warning `NotInjected` about the Pod, saying why.
async fn write_event(client: &Client, instance: &str, skip: &Skip) -> kube::Result<()> {
    let events: Api<Event> = Api::namespaced(client.clone(), &skip.namespace);
    let pod = skip.pod_name_or_generate_name.trim_end_matches('-');
    let event = Event {
        metadata: ObjectMeta {
            // A generateName may end in `-` only (the API server masks a trailing dash, not a dot).
            generate_name: Some(format!("{pod}-not-injected-")),
            namespace: Some(skip.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Warning".into()),
        reason: Some("NotInjected".into()),
        action: Some("Inject".into()),
        note: Some(format!(
            "admitted without the Trellis proxy: {}",
            skip.reason
        )),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(skip.namespace.clone()),
            name: Some(skip.pod_name_or_generate_name.clone()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some("trellis.io/injector".into()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Event::default()
    };
    events
        .create(&PostParams::default(), &event)
        .await
        .map(|_| ())
}
