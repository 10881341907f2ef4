//! Bad edits, missing files and recovery, through the real poller on a real file: the error item
//! names the file and line, the last good content stays in force, and fixing the file ends the
//! staleness.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use trellis_adapter_file::{FileDiscovery, file_discovery, write_demo};
use trellis_discovery::{Discovery, DiscoveryError, ErrorKind, ServiceKey, Snapshot};

const FAST: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(5);

/// Write + rename, so the poller never reads a half-written file.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

type Watch = BoxStream<'static, Result<Snapshot, DiscoveryError>>;

async fn next(watch: &mut Watch) -> Result<Snapshot, DiscoveryError> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("an item within 5 s")
        .expect("watches never end")
}

fn addresses(snapshot: &Snapshot) -> Vec<String> {
    match snapshot {
        Snapshot::NotFound => panic!("want Endpoints, got NotFound"),
        Snapshot::Endpoints(set) => set
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect(),
    }
}

fn file(addresses: &[&str]) -> String {
    let mut text = String::from("namespace: shop\nservices:\n  - name: web\n    endpoints:\n");
    for a in addresses {
        text.push_str(&format!("      - address: {a}\n        port: 8080\n"));
    }
    text
}

#[tokio::test]
async fn a_bad_edit_is_reported_with_file_and_line_and_the_last_good_content_stays() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mesh.yaml");
    write_atomically(&path, &file(&["10.0.0.1"])).expect("write");
    let discovery = FileDiscovery::with_poll_interval(&path, FAST);
    let key = ServiceKey::new("shop", "web");
    let mut watch = discovery.watch(key.clone());
    assert_eq!(
        addresses(&next(&mut watch).await.expect("ok")),
        ["10.0.0.1"]
    );

    // Line 7 holds a bad address.
    write_atomically(&path, &file(&["10.0.0.1", "10.0.0.999"])).expect("write");
    let error = next(&mut watch)
        .await
        .expect_err("the bad edit is an error item");
    assert_eq!(error.kind, ErrorKind::InvalidData);
    assert!(!error.temporary, "a bad edit needs a person: {error}");
    assert_eq!(error.source_id, discovery.source_id());
    let expected = format!("{}:7:", path.display());
    assert!(
        error.message.starts_with(&expected) && error.message.contains("endpoints[1].address"),
        "want {expected}... naming the field, got: {}",
        error.message
    );
    // The error is reported once, and nothing regresses while the file stays bad.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err(),
        "nothing more while the file stays bad"
    );
    // A new watch still gets the last good content first, then the current error.
    let mut late = discovery.watch(key.clone());
    assert_eq!(addresses(&next(&mut late).await.expect("ok")), ["10.0.0.1"]);
    assert_eq!(
        next(&mut late).await.expect_err("stale").kind,
        ErrorKind::InvalidData
    );

    // A good edit applies.
    write_atomically(&path, &file(&["10.0.0.1", "10.0.0.2"])).expect("write");
    assert_eq!(
        addresses(&next(&mut watch).await.expect("ok")),
        ["10.0.0.1", "10.0.0.2"]
    );
}

#[tokio::test]
async fn reverting_a_bad_edit_ends_the_staleness_with_the_same_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mesh.yaml");
    let good = file(&["10.0.0.1"]);
    write_atomically(&path, &good).expect("write");
    let discovery = FileDiscovery::with_poll_interval(&path, FAST);
    let mut watch = discovery.watch(ServiceKey::new("shop", "web"));
    let first = next(&mut watch).await.expect("ok");

    write_atomically(&path, "services:\n  - name: [unclosed\n").expect("write");
    let error = next(&mut watch).await.expect_err("invalid YAML");
    assert!(error.message.contains("mesh.yaml:"), "{error}");

    write_atomically(&path, &good).expect("write");
    assert_eq!(next(&mut watch).await.expect("the snapshot again"), first);
}

#[tokio::test]
async fn a_missing_file_is_unavailable_until_it_appears() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("later.yaml");
    let discovery = FileDiscovery::with_poll_interval(&path, FAST);
    let mut watch = discovery.watch(ServiceKey::new("shop", "web"));
    let mut catalog = discovery.services();

    let error = next(&mut watch).await.expect_err("no file yet");
    assert_eq!(error.kind, ErrorKind::Unavailable);
    assert!(error.temporary);
    assert!(error.message.contains("later.yaml: cannot read"), "{error}");

    write_atomically(&path, &file(&["10.0.0.7"])).expect("write");
    assert_eq!(
        addresses(&next(&mut watch).await.expect("ok")),
        ["10.0.0.7"]
    );
    let listed = loop {
        match tokio::time::timeout(WAIT, catalog.next()).await {
            Ok(Some(Ok(c))) => break c,
            Ok(Some(Err(_))) => continue,
            other => panic!("no catalog: {other:?}"),
        }
    };
    assert_eq!(listed.services, vec![ServiceKey::new("shop", "web")]);
}

#[tokio::test]
async fn the_demo_file_serves_both_version_conventions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_demo(dir.path()).expect("demo written");
    let discovery = file_discovery(&path);

    // Tag style: `web-v2` is the `web` endpoints labelled version=v2, with `web`'s ports.
    let mut web_v2 = discovery.watch(ServiceKey::new("demo", "web-v2"));
    let Snapshot::Endpoints(set) = next(&mut web_v2).await.expect("ok") else {
        panic!("web-v2 resolves to a subset of web")
    };
    assert_eq!(set.service, ServiceKey::new("demo", "web-v2"));
    assert_eq!(set.ports[0].port, 8080);
    let [only] = set.endpoints.as_slice() else {
        panic!("one v2 endpoint: {set:?}")
    };
    assert_eq!(
        (only.address.to_string(), only.ports[0].port),
        ("127.0.0.2".into(), 18082)
    );
    assert_eq!(
        only.identity.spiffe_id("local"),
        "spiffe://local/ns/demo/sa/web"
    );

    // A service per version: `api-v2` is its own service.
    let mut api_v2 = discovery.watch(ServiceKey::new("demo", "api-v2"));
    let Snapshot::Endpoints(set) = next(&mut api_v2).await.expect("ok") else {
        panic!("api-v2 exists")
    };
    assert_eq!(set.endpoints.len(), 1);
    assert_eq!(set.endpoints[0].identity.service_account, "api");

    // Neither `web-v3` nor a base: an empty subset of `web`; `nothing-v1`: NotFound.
    let mut web_v3 = discovery.watch(ServiceKey::new("demo", "web-v3"));
    assert!(addresses(&next(&mut web_v3).await.expect("ok")).is_empty());
    let mut nothing = discovery.watch(ServiceKey::new("demo", "nothing-v1"));
    assert_eq!(next(&mut nothing).await.expect("ok"), Snapshot::NotFound);
}
