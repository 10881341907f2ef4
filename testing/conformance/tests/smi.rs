//! The SMI conformance suite on every platform: one mesh of real processes per platform (run
//! concurrently; on loopback, or on hosts made of network namespaces for the `*-hosts` and
//! `mixed` columns), every scenario on each, the scenario x platform table printed to stdout and
//! written to `<target>/conformance-table.txt`. Fails on any failure; a platform that cannot run
//! here (no `TRELLIS_MOTO_SERVER`, no `TRELLIS_TEST_KUBECONFIG`) is skipped with its reason.
//!
//! The meshes deny by default and run with identities and mTLS ([`Security::Identity`]): the
//! split scenarios run under TrafficTargets that allow their caller, then the access scenarios,
//! the TrafficPolicy rows (issue #12) and the hosts scenarios (on hosts only).

use trellis_conformance::harness::mesh::{Mesh, Security, output_dir};
use trellis_conformance::harness::platform::PlatformKind;
use trellis_conformance::scenarios::{
    self, ACCESS_SCENARIOS, HOSTS_SCENARIOS, Outcome, POLICY_SCENARIOS, SPLIT_SCENARIOS,
};
use trellis_conformance::table::Table;

/// What one platform produced: its outcomes and, when something failed, its logs.
struct PlatformRun {
    kind: PlatformKind,
    outcomes: Vec<(&'static str, Outcome)>,
    logs: Option<String>,
}

async fn run_platform(kind: PlatformKind, security: Security) -> PlatformRun {
    let all = |outcome: Outcome| -> Vec<(&'static str, Outcome)> {
        SPLIT_SCENARIOS
            .iter()
            .chain(&ACCESS_SCENARIOS)
            .chain(&POLICY_SCENARIOS)
            .chain(&HOSTS_SCENARIOS)
            .map(|s| (*s, outcome.clone()))
            .collect()
    };
    let mesh = match Mesh::start(kind, security).await {
        Ok(Ok(mesh)) => mesh,
        Ok(Err(reason)) => {
            return PlatformRun {
                kind,
                outcomes: all(Outcome::Skip(reason)),
                logs: None,
            };
        }
        Err(e) => {
            return PlatformRun {
                kind,
                outcomes: all(Outcome::Fail(format!("mesh did not start: {e:#}"))),
                logs: Some(format!(
                    "logs in {}",
                    output_dir().join(kind.name()).display()
                )),
            };
        }
    };
    // `TRELLIS_CONFORMANCE_GROUPS=policy` runs only those groups of rows (development).
    let groups = std::env::var("TRELLIS_CONFORMANCE_GROUPS").ok();
    let run = |group: &str| {
        groups
            .as_deref()
            .is_none_or(|groups| groups.split(',').any(|g| g == group))
    };
    let mut outcomes = Vec::new();
    if run("split") {
        outcomes.extend(scenarios::split_scenarios(&mesh).await);
    }
    if run("access") {
        match security {
            Security::Identity => outcomes.extend(scenarios::access_scenarios(&mesh).await),
            // Everything is allowed: there is no access control to check.
            Security::Permissive => outcomes.extend(
                ACCESS_SCENARIOS
                    .iter()
                    .map(|s| (*s, Outcome::Skip("permissive mesh".into()))),
            ),
        }
    }
    // Before the hosts rows, whose outages leave the registry re-registering b.
    if run("policy") {
        outcomes.extend(scenarios::policy_scenarios(&mesh).await);
    }
    if run("hosts") {
        outcomes.extend(scenarios::hosts_scenarios(&mesh).await);
    }
    let logs = outcomes
        .iter()
        .any(|(_, o)| o.is_fail())
        .then(|| mesh.logs(15));
    mesh.cleanup().await;
    PlatformRun {
        kind,
        outcomes,
        logs,
    }
}

#[test]
fn smi_conformance_on_every_platform() {
    let security = Security::Identity;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs = runtime.block_on(async {
        // `TRELLIS_CONFORMANCE_ONLY=consul-hosts,mixed` runs only those columns (development).
        let only = std::env::var("TRELLIS_CONFORMANCE_ONLY").ok();
        let tasks: Vec<_> = PlatformKind::ALL
            .into_iter()
            .filter(|kind| {
                only.as_deref()
                    .is_none_or(|only| only.split(',').any(|name| name == kind.name()))
            })
            .map(|kind| tokio::spawn(run_platform(kind, security)))
            .collect();
        let mut runs = Vec::new();
        for task in tasks {
            runs.push(task.await.expect("a platform run panicked"));
        }
        runs
    });

    let mut table = Table::default();
    for run in &runs {
        for (scenario, outcome) in &run.outcomes {
            table.add(scenario, run.kind.name(), outcome.clone());
        }
    }
    let text = table.render(true);
    println!("\nSMI conformance (scenario x platform), security {security:?}\n{text}");
    let path = output_dir().with_file_name("conformance-table.txt");
    match std::fs::write(&path, &text) {
        Ok(()) => println!("(table written to {})", path.display()),
        Err(e) => println!("(could not write {}: {e})", path.display()),
    }
    for run in &runs {
        if let Some(logs) = &run.logs {
            eprintln!("=== {} ===\n{logs}", run.kind.name());
        }
    }
    let failures = table.failures();
    assert!(
        failures.is_empty(),
        "{} conformance failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
