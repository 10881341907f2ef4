//! The same suite, unchanged, against a real Consul agent when `TRELLIS_TEST_CONSUL_ADDR` names
//! one (e.g. `http://127.0.0.1:8500`; ACL token in `TRELLIS_TEST_CONSUL_TOKEN`). The outage
//! scenario skips itself there (the harness cannot take a real agent away).

#[path = "support/harness.rs"]
mod harness;

use trellis_discovery_suite::{Scenario, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_against_a_real_agent() {
    let Some(registry) = harness::agent_harness().await else {
        println!(
            "skipped: TRELLIS_TEST_CONSUL_ADDR is not set (no real Consul agent to test against)"
        );
        return;
    };
    for scenario in Scenario::ALL {
        println!("scenario {scenario:?}");
        run(scenario, &registry).await;
    }
}
