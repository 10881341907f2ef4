//! Two `trellis controller --platform kubernetes` processes against the fake API server: one
//! leads (shown by `trellis check`, `/api/v1/state` and `trellis_controller_leader`) and writes
//! the Event about a split whose weights sum to 0; on SIGTERM it releases the Lease and the other
//! takes over at once. Both serve proxies' admin and gRPC ports throughout.
#![cfg(feature = "kubernetes")]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use trellis_testing::{
    ControllerProcess, controller_command, http_get, kube_client, smi_api_server, split_type,
    write_kubeconfig,
};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn controller(kubeconfig: &std::path::Path) -> ControllerProcess {
    ControllerProcess::spawn(
        controller_command(TRELLIS)
            .env("KUBECONFIG", kubeconfig)
            .args(["--platform", "kubernetes"])
            // Short timings: a 2 s lease renewed every 200 ms.
            .args(["--lease-duration", "2", "--lease-renew", "200"]),
    )
}

fn check(admin: SocketAddr) -> String {
    let out: Output = Command::new(TRELLIS)
        .args(["check", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `trellis_controller_leader` gauge of a controller.
fn leader_gauge(admin: SocketAddr) -> Option<String> {
    let (_, metrics) = http_get(admin, "/metrics").ok()?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("trellis_controller_leader "))
        .map(str::to_owned)
}

/// Polls `f` until it gives `Some` (at most 10 s).
fn until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    trellis_testing::poll_until(what, 10, f)
}

#[test]
fn one_of_two_controller_processes_leads_writes_events_and_hands_over_on_sigterm() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(smi_api_server());
    server
        .store()
        .apply(
            &split_type(),
            serde_json::json!({
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "zero", "namespace": "shop"},
                "spec": {"service": "api", "backends": [{"service": "api-v1", "weight": 0}]}
            }),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&server, &kubeconfig).unwrap();
    // The kube client's service buffer is spawned on the runtime it is built in.
    let _runtime_context = runtime.enter();
    let client = kube_client(&server);

    let mut controllers = vec![controller(&kubeconfig), controller(&kubeconfig)];
    let leader = until("a leader", || {
        controllers
            .iter()
            .position(|c| check(c.admin).contains("leader: this replica ("))
    });
    let follower = 1 - leader;
    let follower_check = until("the follower's view", || {
        let text = check(controllers[follower].admin);
        text.contains("follows, Lease trellis-system/trellis-controller")
            .then_some(text)
    });
    assert!(
        !follower_check.contains("leader: this replica ("),
        "{follower_check}"
    );
    assert_eq!(
        leader_gauge(controllers[leader].admin).as_deref(),
        Some("1")
    );
    assert_eq!(
        leader_gauge(controllers[follower].admin).as_deref(),
        Some("0")
    );

    // The leader writes the Event about the split (and only it: one Event, its identity).
    let events: Api<Event> = Api::namespaced(client.clone(), "shop");
    let event = until("the Event", || {
        let list = runtime.block_on(events.list(&ListParams::default())).ok()?;
        list.items.into_iter().next()
    });
    assert_eq!(event.reason.as_deref(), Some("WeightsSumToZero"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), "trellis-system");
    let holder = |leases: &Api<Lease>| {
        runtime
            .block_on(leases.get("trellis-controller"))
            .ok()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    let leader_identity = holder(&leases).expect("a holder");
    assert_eq!(
        event.reporting_instance.as_deref(),
        Some(leader_identity.as_str())
    );
    assert!(
        leader_identity.ends_with(&format!("-{}", controllers[leader].pid())),
        "identity is hostname-pid: {leader_identity}"
    );

    // SIGTERM: the leader releases the Lease and the follower takes over without waiting for
    // it to expire.
    let status = Command::new("kill")
        .args(["-TERM", &controllers[leader].pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = controllers[leader].wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    until("the follower leading", || {
        check(controllers[follower].admin)
            .contains("leader: this replica (")
            .then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "takeover after release took {:?}",
        started.elapsed()
    );
    assert_ne!(holder(&leases), Some(leader_identity));
    controllers.clear();
}
