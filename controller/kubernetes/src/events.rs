//! Kubernetes Events for policy problems: `kubectl describe trafficsplit web` shows what is wrong
//! with it (weights summing to 0, a backend that does not exist yet, a backend without the
//! root's port, several splits for one root, a missing HTTPRouteGroup, an object the smi crate
//! rejects).
//!
//! [`spawn`] follows the index's problems (`Status::problems`) and writes `events.k8s.io/v1`
//! Events, only while this replica is the leader ([`crate::leader`]), only about SMI objects the
//! Kubernetes policy source holds, and never writes to the SMI objects themselves. Which object
//! a problem is about is its location: every problem about a resource is located at the
//! resource's origin, `kubernetes TrafficSplit shop/web` for the source's objects
//! ([`located_object`], looked up in [`ObjectRefs`]). Problems located in policy files, at
//! `discovery` or at a failing watch name no object and are not Events.
//!
//! One Event per (object uid, problem): the Event's name is `<object name>.<hash>` of the uid,
//! reason and note, so every replica names the same problem the same way. A problem that appears
//! creates the Event; when it is seen again (it went away and came back, this replica became
//! leader while it stands, or it still stands after [`EventOptions::refresh`]) the Event's
//! `series` is patched (`count` + 1, `lastObservedTime` now) instead of adding another Event.
//! The refresh keeps a lasting problem visible past the API server's Event TTL (1 h by default).
//!
//! Decision: kube-runtime's `events::Recorder` keys its series by (reason, action, object) and
//! not by the note, and keeps its series in memory only, so two different problems with one
//! reason on one object would share an Event, and a new leader would start new Events for the
//! old problems. This module follows the Recorder's wire format (events.k8s.io/v1, `series` on
//! repeats) with a deterministic name instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::policy::{ObjectRefs, located_object};
use trellis_controller_core::index::{ProblemLine, Status};

/// Who writes the Events and how often lasting problems are re-observed.
#[derive(Clone, Debug)]
pub struct EventOptions {
    /// `reportingController`.
    pub controller: String,
    /// `reportingInstance`: this replica (the leader election identity).
    pub instance: String,
    /// A problem that still stands is re-observed (series count + 1) this often.
    pub refresh: Duration,
    /// How often Events that could not be written are tried again.
    pub retry: Duration,
}

impl EventOptions {
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            controller: "trellis.io/controller".into(),
            instance: instance.into(),
            refresh: Duration::from_secs(30 * 60),
            retry: Duration::from_secs(5),
        }
    }
}

/// One Event: the object and the problem.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    /// The object's uid (its name when the uid is unknown): a recreated object gets new Events.
    object: String,
    reason: &'static str,
    note: String,
}

/// What this replica wrote for a key.
struct Written {
    count: i32,
    at: Instant,
}

/// Starts writing Events for the problems of `status` about objects in `objects`, while
/// `leader` is true. Stops when the index stops.
pub fn spawn(
    client: Client,
    status: watch::Receiver<Arc<Status>>,
    objects: ObjectRefs,
    leader: watch::Receiver<bool>,
    options: EventOptions,
) -> JoinHandle<()> {
    let writer = Writer {
        client,
        objects,
        options,
        written: HashMap::new(),
        standing: HashSet::new(),
        last_error: None,
    };
    tokio::spawn(writer.run(status, leader))
}

struct Writer {
    client: Client,
    objects: ObjectRefs,
    options: EventOptions,
    written: HashMap<Key, Written>,
    /// The problems published (or re-observed) while they stand; one that leaves and comes back
    /// is a repeat.
    standing: HashSet<Key>,
    /// The last write error logged.
    last_error: Option<String>,
}

impl Writer {
    async fn run(
        mut self,
        mut status: watch::Receiver<Arc<Status>>,
        mut leader: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.options.retry);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                // A closed leader channel keeps its last value (see `leader::Leadership`).
                Ok(()) = leader.changed() => {}
                _ = tick.tick() => {}
            }
            if !*leader.borrow_and_update() {
                // A follower writes nothing; whatever stands when it becomes leader is a repeat
                // (or new) for it.
                self.standing.clear();
                continue;
            }
            let problems = status.borrow_and_update().problems.clone();
            self.sync(&problems).await;
        }
    }

    /// Writes what is new or due for the problems standing now.
    async fn sync(&mut self, problems: &[ProblemLine]) {
        let mut now_standing = HashSet::new();
        for problem in problems {
            let Some((key, regarding)) = self.event_for(problem) else {
                continue;
            };
            if !now_standing.insert(key.clone()) {
                continue;
            }
            let due = !self.standing.contains(&key)
                || self
                    .written
                    .get(&key)
                    .is_none_or(|w| w.at.elapsed() >= self.options.refresh);
            if !due {
                continue;
            }
            match self.publish(&key, &regarding).await {
                Ok(()) => {}
                Err(e) => {
                    // Once per new error (missing RBAC would otherwise log every retry).
                    let error = e.to_string();
                    if self.last_error.as_ref() != Some(&error) {
                        tracing::warn!(
                            "writing the Event about {} {}/{} failed (retrying every {:?}): {error}",
                            regarding.kind.as_deref().unwrap_or_default(),
                            key.namespace,
                            regarding.name.as_deref().unwrap_or_default(),
                            self.options.retry,
                        );
                        self.last_error = Some(error);
                    }
                    // Not standing yet: tried again at the next tick.
                    now_standing.remove(&key);
                }
            }
        }
        self.standing = now_standing;
        self.written
            .retain(|key, w| self.standing.contains(key) || w.at.elapsed() < self.options.refresh);
    }

    /// The Event key and object of a problem, if it is about an SMI object from Kubernetes.
    fn event_for(&self, problem: &ProblemLine) -> Option<(Key, ObjectReference)> {
        let regarding = self.objects.get(located_object(&problem.location)?)?;
        // The location is the object the Event is about (`regarding`): the note is the message,
        // which names the service concerned where there is one (`backend shop/web-v2: ...`).
        let note = problem.message.clone();
        let key = Key {
            namespace: regarding
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            object: regarding
                .uid
                .clone()
                .or_else(|| regarding.name.clone())
                .unwrap_or_default(),
            reason: reason(&problem.message),
            note: truncate(note, 1024),
        };
        Some((key, regarding))
    }

    /// Creates the Event, or counts one more observation of it.
    async fn publish(&mut self, key: &Key, regarding: &ObjectReference) -> kube::Result<()> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
        let name = event_name(key, regarding);
        let now = Timestamp::now();
        let known = self.written.get(key).map(|w| w.count);
        let count = match known {
            Some(count) => match bump(&events, &name, count + 1, now).await {
                Ok(()) => count + 1,
                // Expired (Event TTL) or deleted: start again.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.create(&events, &name, key, regarding, now).await?
                }
                Err(e) => return Err(e),
            },
            None => self.create(&events, &name, key, regarding, now).await?,
        };
        self.written.insert(
            key.clone(),
            Written {
                count,
                at: Instant::now(),
            },
        );
        Ok(())
    }

    /// Creates the Event; if it exists (an earlier leader wrote it), counts one more. Returns
    /// the count now on the Event.
    async fn create(
        &self,
        events: &Api<Event>,
        name: &str,
        key: &Key,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> kube::Result<i32> {
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(key.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(key.reason.into()),
            action: Some("ApplyPolicy".into()),
            note: Some(key.note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.options.controller.clone()),
            reporting_instance: Some(truncate(self.options.instance.clone(), 128)),
            ..Event::default()
        };
        match events.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(1),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = events.get(name).await?;
                let count = existing.series.map_or(1, |s| s.count) + 1;
                bump(events, name, count, now).await?;
                Ok(count)
            }
            Err(e) => Err(e),
        }
    }
}

/// Patches the Event's series: `count`, `lastObservedTime` now.
async fn bump(events: &Api<Event>, name: &str, count: i32, now: Timestamp) -> kube::Result<()> {
    let patch = Event {
        series: Some(EventSeries {
            count,
            last_observed_time: MicroTime(now),
        }),
        ..Event::default()
    };
    events
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// The Event's `reason` (PascalCase, for filtering) from the index's and source's wording.
fn reason(message: &str) -> &'static str {
    const REASONS: [(&str, &str); 7] = [
        ("weights sum to 0", "WeightsSumToZero"),
        ("does not exist", "BackendMissing"),
        ("lacks the root's port", "BackendPortMismatch"),
        ("several splits for one root", "SeveralSplitsForRoot"),
        ("is referenced but missing", "RouteGroupMissing"),
        ("no backend can take traffic", "NoBackendServes"),
        (
            "also held by an earlier policy source",
            "HeldByAnotherSource",
        ),
    ];
    REASONS
        .iter()
        .find(|(words, _)| message.contains(words))
        .map_or("InvalidPolicy", |(_, reason)| reason)
}

/// `<object name>.<16 hex digits>`: stable across replicas for one (object, problem).
fn event_name(key: &Key, regarding: &ObjectReference) -> String {
    let hash = fnv1a(&[&key.object, key.reason, &key.note]);
    let object = regarding.name.as_deref().unwrap_or("object");
    // Names are at most 253 characters.
    let object: String = object.chars().take(253 - 17).collect();
    format!("{object}.{hash:016x}")
}

/// FNV-1a 64: a stable hash (std's `DefaultHasher` may change between Rust releases, and
/// replicas of different builds must agree).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_the_problem_wording() {
        assert_eq!(
            reason("weights sum to 0: the split is inactive"),
            "WeightsSumToZero"
        );
        assert_eq!(
            reason("backend service does not exist (yet): its share gets no endpoints"),
            "BackendMissing"
        );
        assert_eq!(
            reason("backend lacks the root's port 80: it gets no traffic"),
            "BackendPortMismatch"
        );
        assert_eq!(
            reason("several splits for one root: this one is in force"),
            "SeveralSplitsForRoot"
        );
        assert_eq!(
            reason("HTTPRouteGroup shop/x is referenced but missing"),
            "RouteGroupMissing"
        );
        assert_eq!(
            reason("spec.backends[1].weight: must not be negative; not applied"),
            "InvalidPolicy"
        );
    }

    #[test]
    fn only_problems_located_at_a_kubernetes_object_become_events() {
        assert_eq!(
            located_object("kubernetes TrafficSplit shop/web"),
            Some("TrafficSplit shop/web")
        );
        assert_eq!(
            located_object("kubernetes HTTPRouteGroup shop/api-routes"),
            Some("HTTPRouteGroup shop/api-routes")
        );
        assert_eq!(located_object("kubernetes TrafficSplit watch"), None);
        assert_eq!(located_object("kubernetes"), None);
        assert_eq!(located_object("policies/split.yaml:12"), None);
        assert_eq!(located_object("kubernetes.yaml:3"), None);
        assert_eq!(located_object("discovery"), None);
        assert_eq!(located_object("policy"), None);
    }

    #[test]
    fn event_names_are_stable_and_distinct_per_problem() {
        let key = |note: &str| Key {
            namespace: "shop".into(),
            object: "uid-1".into(),
            reason: "BackendMissing",
            note: note.into(),
        };
        let regarding = ObjectReference {
            name: Some("web".into()),
            ..ObjectReference::default()
        };
        let a = event_name(&key("backend shop/v2: missing"), &regarding);
        assert_eq!(a, event_name(&key("backend shop/v2: missing"), &regarding));
        assert_ne!(a, event_name(&key("backend shop/v3: missing"), &regarding));
        assert!(a.starts_with("web.") && a.len() == "web.".len() + 16, "{a}");
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate("short".into(), 10), "short");
        let long = "é".repeat(10);
        let cut = truncate(long, 8);
        assert!(cut.len() <= 8 && cut.ends_with("..."), "{cut}");
    }
}
