//! CRD conversion through the fake, with a real kube client: storing a CRD establishes its served
//! versions; with strategy `None` only `apiVersion` changes between versions of one stored
//! object; with strategy `Webhook` a webhook that cannot be reached (a Service reference, a URL
//! nobody listens on) fails the request with the API server's 500 and stores nothing, and a
//! watch at a version other than the storage version is refused saying why. (The webhook that
//! answers is exercised with the controller's own in `cli/tests/webhook_cli.rs`.)

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams, WatchParams};
use serde_json::{Value, json};
use trellis_kube_fake::{FakeApiServer, ResourceType};

fn client(server: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client")
}

/// A namespaced `Widget` CRD in `example.com`, versions v1 and v2 (v2 stored).
fn crd(conversion: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {"name": "v2", "served": true, "storage": true, "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
                {"name": "v1", "served": true, "storage": false, "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
            ],
            "conversion": conversion,
        },
    })
}

fn widgets(client: &kube::Client, version: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "example.com".into(),
        version: version.into(),
        api_version: format!("example.com/{version}"),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    Api::namespaced_with(client.clone(), "default", &resource)
}

fn widget(version: &str, name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("example.com/{version}"), "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"size": 3},
    }))
    .unwrap()
}

async fn server_with(conversion: Value) -> FakeApiServer {
    let server = FakeApiServer::start().await.unwrap();
    let crd_type = ResourceType::of::<CustomResourceDefinition>(false);
    server.register(crd_type.clone());
    server.store().apply(&crd_type, crd(conversion)).unwrap();
    server
}

#[tokio::test]
async fn strategy_none_serves_one_stored_object_at_every_served_version() {
    let server = server_with(json!({"strategy": "None"})).await;
    let client = client(&server);
    widgets(&client, "v1")
        .create(&PostParams::default(), &widget("v1", "a"))
        .await
        .expect("v1 is served once the CRD is stored");
    let at_v2 = widgets(&client, "v2").get("a").await.unwrap();
    assert_eq!(at_v2.types.unwrap().api_version, "example.com/v2");
    assert_eq!(at_v2.data["spec"]["size"], 3);
    let listed = widgets(&client, "v1")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "one object, not one per version");
    assert_eq!(
        listed.items[0].types.as_ref().unwrap().api_version,
        "example.com/v1"
    );
}

#[tokio::test]
async fn an_unreachable_webhook_fails_the_request_like_the_api_server_and_stores_nothing() {
    for (config, why) in [
        (
            json!({"service": {"namespace": "x", "name": "y", "path": "/convert"}}),
            "clientConfig.service",
        ),
        (
            // Nothing listens on port 9 of loopback (discard is not served here).
            json!({"url": "https://127.0.0.1:9/convert", "caBundle": "TUlT"}),
            "Post",
        ),
    ] {
        let server = server_with(json!({
            "strategy": "Webhook",
            "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": config},
        }))
        .await;
        let client = client(&server);
        let error = widgets(&client, "v1")
            .create(&PostParams::default(), &widget("v1", "b"))
            .await
            .expect_err("the conversion webhook is unreachable");
        let kube::Error::Api(status) = error else {
            panic!("an API error, got {error:?}")
        };
        assert_eq!(status.code, 500, "{status:?}");
        assert_eq!(status.reason, "InternalError");
        assert!(
            status
                .message
                .starts_with("conversion webhook for example.com/v2, Kind=Widget failed: "),
            "{}",
            status.message
        );
        assert!(status.message.contains(why), "{}", status.message);
        // Nothing was stored at the storage version either.
        let stored = widgets(&client, "v2")
            .list(&ListParams::default())
            .await
            .unwrap();
        assert!(stored.items.is_empty());
        // The storage version needs no conversion and works.
        widgets(&client, "v2")
            .create(&PostParams::default(), &widget("v2", "c"))
            .await
            .unwrap();
        // A watch at another version is refused, saying why.
        let message = match widgets(&client, "v1")
            .watch(&WatchParams::default(), "0")
            .await
        {
            Err(error) => error.to_string(),
            Ok(stream) => {
                use futures::StreamExt as _;
                format!("{:?}", Box::pin(stream).next().await)
            }
        };
        assert!(message.contains("storage version"), "{message}");
    }
}
