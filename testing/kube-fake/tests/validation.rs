//! Validation through the server, with a real kube client: a write a real API server refuses is
//! refused here with the same 422 `Invalid` status (message, reason, `details.causes`), and
//! nothing is stored; valid writes (namespace addresses, generateName, patches) go through.

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use trellis_kube_fake::FakeApiServer;

fn client(server: &FakeApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client")
}

fn slice(name: &str, address: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "app-svc"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 4000, "appProtocol": "http"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "app-b-0", "namespace": "default"}}],
    }))
    .expect("a slice")
}

/// The status of an API error, or a panic naming what came instead.
fn status(result: kube::Result<impl std::fmt::Debug>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_loopback_endpoint_address_is_refused_as_a_real_server_refuses_it() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<EndpointSlice> = Api::namespaced(client(&server), "default");
    let s = status(
        api.create(
            &PostParams::default(),
            &slice("app-svc-app-b-0", "127.0.50.2"),
        )
        .await,
    );
    assert_eq!(s.code, 422);
    assert_eq!(s.reason, "Invalid");
    assert_eq!(
        s.message,
        "EndpointSlice.discovery.k8s.io \"app-svc-app-b-0\" is invalid: endpoints[0].addresses[0]: Invalid value: \"127.0.50.2\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
    );
    let details = s.details.as_ref().expect("details");
    assert_eq!(
        (
            details.name.as_str(),
            details.group.as_str(),
            details.kind.as_str()
        ),
        ("app-svc-app-b-0", "discovery.k8s.io", "EndpointSlice")
    );
    assert_eq!(details.causes.len(), 1);
    assert_eq!(details.causes[0].reason, "FieldValueInvalid");
    assert_eq!(details.causes[0].field, "endpoints[0].addresses[0]");
    assert_eq!(
        details.causes[0].message,
        "Invalid value: \"127.0.50.2\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
    );
    assert!(
        api.get_opt("app-svc-app-b-0").await.unwrap().is_none(),
        "nothing stored"
    );

    // An address a network namespace holds is fine, and the server's defaults are filled in.
    let created = api
        .create(
            &PostParams::default(),
            &slice("app-svc-app-b-0", "198.18.40.5"),
        )
        .await
        .unwrap();
    let port = &created.ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));

    // A merge patch that would make it invalid is refused the same way; a replace too.
    let patch = json!({"endpoints": [{"addresses": ["0.0.0.0"]}]});
    let s = status(
        api.patch(
            "app-svc-app-b-0",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    );
    assert_eq!(s.code, 422);
    assert_eq!(
        s.details.as_ref().unwrap().causes[0].message,
        "Invalid value: \"0.0.0.0\": may not be unspecified (0.0.0.0)"
    );
    let mut changed = created.clone();
    changed.address_type = "IPv6".into();
    changed.endpoints.as_mut().unwrap()[0].addresses = vec!["::1".into()];
    let s = status(
        api.replace("app-svc-app-b-0", &PostParams::default(), &changed)
            .await,
    );
    let fields: Vec<(&str, &str)> = s
        .details
        .as_ref()
        .unwrap()
        .causes
        .iter()
        .map(|c| (c.field.as_str(), c.message.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (
                "endpoints[0].addresses[0]",
                "Invalid value: \"::1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
            ),
            ("addressType", "Invalid value: \"IPv6\": field is immutable"),
        ]
    );
    let stored = api.get("app-svc-app-b-0").await.unwrap();
    assert_eq!(stored.endpoints.unwrap()[0].addresses, ["198.18.40.5"]);
}

#[tokio::test]
async fn pods_and_services_are_validated_and_generate_name_works() {
    let server = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    let bad: Pod = serde_json::from_value(json!({
        "metadata": {"name": "App-B-0"},
        "spec": {"containers": [{"name": "app"}]},
    }))
    .unwrap();
    let s = status(pods.create(&PostParams::default(), &bad).await);
    assert_eq!(s.code, 422);
    assert!(
        s.message.starts_with("Pod \"App-B-0\" is invalid: [metadata.name: Invalid value: \"App-B-0\": a lowercase RFC 1123 subdomain"),
        "{}",
        s.message
    );
    assert!(
        s.message
            .ends_with(", spec.containers[0].image: Required value]"),
        "{}",
        s.message
    );
    assert!(s.details.as_ref().unwrap().group.is_empty());

    let generated: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "app-b-"},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap();
    let a = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let b = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let (a, b) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(
        a.starts_with("app-b-") && a.len() == "app-b-".len() + 5,
        "{a}"
    );
    assert_ne!(a, b);
    let nameless: Pod =
        serde_json::from_value(json!({"spec": {"containers": [{"name": "app", "image": "x"}]}}))
            .unwrap();
    let s = status(pods.create(&PostParams::default(), &nameless).await);
    assert_eq!(
        s.message,
        "Pod \"\" is invalid: metadata.name: Required value: name or generateName is required"
    );

    let services: Api<Service> = Api::namespaced(client(&server), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "app-svc"},
        "spec": {"clusterIP": "127.0.0.1.5", "ports": [{"name": "http", "port": 4000}]},
    }))
    .unwrap();
    let s = status(services.create(&PostParams::default(), &svc).await);
    assert_eq!(
        s.message,
        "Service \"app-svc\" is invalid: spec.clusterIPs[0]: Invalid value: \"127.0.0.1.5\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    );
}

#[tokio::test]
async fn direct_writes_are_validated_too() {
    // Tests seed the fake with `put`/`apply` as a kubelet or controller would write: the same
    // rules hold, so seeding cannot smuggle in what a real server refuses.
    let server = FakeApiServer::start().await.unwrap();
    let e = server.put(&slice("web-0", "127.0.0.1")).unwrap_err();
    assert_eq!(e.code, 422);
    assert!(
        e.message.contains("may not be in the loopback range"),
        "{e}"
    );
    server.put(&slice("web-0", "10.1.2.3")).unwrap();
}
