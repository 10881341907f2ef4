//! The fake server driven by a real kube client: list paging, watch resume, bookmarks, 410 Gone
//! after compaction, writes, discovery and outage.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::core::ObjectMeta;
use trellis_kube_fake::FakeApiServer;

fn client(server: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

fn config_map(name: &str, app: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            labels: Some([("app".to_owned(), app.to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> WatchEvent<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("a watch event within 5 s")
        .expect("watch stream error")
        .expect("watch stream ended")
}

#[tokio::test]
async fn writes_lists_pages_and_selectors_round_trip_through_kube() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    for i in 0..5 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("cm{i}"), if i % 2 == 0 { "even" } else { "odd" }),
        )
        .await
        .unwrap();
    }
    let dup = api
        .create(&PostParams::default(), &config_map("cm0", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(dup, kube::Error::Api(ref s) if s.code == 409),
        "{dup:?}"
    );

    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("a continue token");
    let rest = api
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);
    assert!(rest.metadata.continue_.is_none());
    assert_eq!(
        rest.metadata.resource_version,
        first.metadata.resource_version
    );

    let even = api
        .list(&ListParams::default().labels("app=even"))
        .await
        .unwrap();
    assert_eq!(even.items.len(), 3);
    let named = api
        .list(&ListParams::default().fields("metadata.name=cm1"))
        .await
        .unwrap();
    assert_eq!(named.items.len(), 1);

    api.delete("cm1", &DeleteParams::default()).await.unwrap();
    let missing = api.get("cm1").await.unwrap_err();
    assert!(
        matches!(missing, kube::Error::Api(ref s) if s.code == 404),
        "{missing:?}"
    );
}

#[tokio::test]
async fn watch_resumes_from_a_version_and_sends_bookmarks() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    let created = api
        .create(&PostParams::default(), &config_map("a", "web"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();
    api.create(&PostParams::default(), &config_map("b", "web"))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    let mut events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Added(cm) if cm.metadata.name.as_deref() == Some("b"))
    );
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Deleted(cm) if cm.metadata.name.as_deref() == Some("a"))
    );
    server.send_bookmarks();
    match next_event(&mut events).await {
        WatchEvent::Bookmark(bm) => assert_eq!(
            bm.metadata.resource_version,
            server.store().resource_version().to_string()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn watching_from_a_compacted_version_gets_410_gone() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    let created = api
        .create(&PostParams::default(), &config_map("a", "web"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &config_map("b", "web"))
        .await
        .unwrap();
    let compacted = server.compact();
    let old = created.metadata.resource_version.unwrap();
    let mut events = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut events).await {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert!(
                status.message.contains("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // From the compacted version itself the watch works.
    let mut events = api
        .watch(&WatchParams::default(), &compacted.to_string())
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &config_map("c", "web"))
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut events).await, WatchEvent::Added(cm) if cm.metadata.name.as_deref() == Some("c"))
    );
    assert!(server.store().stats().watches.iter().any(|w| w.gone));
}

#[tokio::test]
async fn a_selector_watch_sees_objects_leave_and_enter_its_selection() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    api.create(&PostParams::default(), &config_map("a", "web"))
        .await
        .unwrap();
    let rv = server.store().resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default().labels("app=web"), &rv)
        .await
        .unwrap()
        .boxed();
    api.replace("a", &PostParams::default(), &config_map("a", "db"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        WatchEvent::Deleted(_)
    ));
    api.replace("a", &PostParams::default(), &config_map("a", "web"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        WatchEvent::Added(_)
    ));
}

#[tokio::test]
async fn outage_refuses_connections_and_the_server_returns_at_the_same_port_with_its_content() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    api.create(&PostParams::default(), &config_map("a", "web"))
        .await
        .unwrap();
    server.begin_outage();
    assert!(
        api.get("a").await.is_err(),
        "requests fail during the outage"
    );
    server.end_outage().await.unwrap();
    assert_eq!(
        api.get("a").await.unwrap().metadata.name.as_deref(),
        Some("a")
    );
}

#[tokio::test]
async fn discovery_documents_list_the_registered_resources() {
    let server = FakeApiServer::start().await.unwrap();
    let client = client(&server);
    let groups = client.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
    let core = client.list_core_api_resources("v1").await.unwrap();
    assert!(
        core.resources
            .iter()
            .any(|r| r.name == "pods" && r.namespaced)
    );
    server.register(trellis_kube_fake::ResourceType::new(
        "split.smi-spec.io",
        "v1alpha4",
        "trafficsplits",
        "TrafficSplit",
        true,
    ));
    let smi = client
        .list_api_group_resources("split.smi-spec.io/v1alpha4")
        .await
        .unwrap();
    assert_eq!(smi.resources[0].kind, "TrafficSplit");
}

#[tokio::test]
async fn kube_watcher_streaming_lists_end_the_initial_state_with_a_marked_bookmark() {
    use kube::runtime::watcher::{self, Event};
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name, "web"))
            .await
            .unwrap();
    }
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let mut initial = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .expect("an event within 5 s")
            .expect("watcher error")
            .expect("watcher ended");
        match event {
            Event::Init => {}
            Event::InitApply(cm) => initial.push(cm.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("unexpected {other:?} before InitDone"),
        }
    }
    assert_eq!(initial, ["a", "b"]);
    api.create(&PostParams::default(), &config_map("c", "web"))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), events.try_next()).await;
    assert!(
        matches!(next, Ok(Ok(Some(Event::Apply(ref cm)))) if cm.metadata.name.as_deref() == Some("c")),
        "{next:?}"
    );
}

#[tokio::test]
async fn timeout_seconds_ends_the_watch_stream() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server), "ns");
    let mut events = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let ended = tokio::time::timeout(Duration::from_secs(5), events.try_next()).await;
    assert!(
        matches!(ended, Ok(Ok(None))),
        "the stream ends after timeoutSeconds: {ended:?}"
    );
    assert_eq!(server.store().watch_count(), 0);
}
