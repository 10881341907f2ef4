//! The scenario bodies. (Being written by the adapters-core engineer.)

use crate::{Scenario, TestRegistry};

pub(crate) async fn run(scenario: Scenario, registry: &dyn TestRegistry) {
    let _ = registry;
    panic!("scenario {scenario:?} is not written yet");
}
