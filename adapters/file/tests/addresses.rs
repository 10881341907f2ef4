//! Addresses through the real poller on a real file: a virtual address added after the first ask
//! is found, removed it is unknown again (what an intercepted connection's lookup follows).

use std::time::Duration;

use futures::StreamExt;
use trellis_adapter_file::file_discovery;
use trellis_discovery::{AddressOwner, Discovery, ServiceKey};

const WITHOUT: &str = "services:\n  - name: web\n    ports: [{ port: 80 }]\n    endpoints: [{ address: 10.0.0.1, port: 8080 }]\n";
const WITH: &str = "services:\n  - name: web\n    addresses: [10.96.0.10]\n    ports: [{ port: 80 }]\n    endpoints: [{ address: 10.0.0.1, port: 8080 }]\n";

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_virtual_address_follows_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    write_atomically(&path, WITHOUT);
    // Through the version-subset wrapper, as the controller uses it.
    let discovery = file_discovery(&path);
    let mut owner = discovery.watch_address("10.96.0.10".parse().unwrap());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), owner.next())
            .await
            .expect("an answer within 5 s")
            .expect("watches never end")
            .expect("a good file")
    };
    assert_eq!(next().await, AddressOwner::Unknown);
    write_atomically(&path, WITH);
    match next().await {
        AddressOwner::Service { service, ports } => {
            assert_eq!(service, ServiceKey::new("default", "web"));
            assert_eq!(ports[0].port, 80);
        }
        other => panic!("want the service, got {other:?}"),
    }
    write_atomically(&path, WITHOUT);
    assert_eq!(next().await, AddressOwner::Unknown);
}
