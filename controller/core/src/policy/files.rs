//! A watched directory (or files) of SMI YAML as a [`PolicySource`]: local mode and platforms
//! without Kubernetes (Consul, Cloud Map, files). Every kind `trellis_smi` loads is read here,
//! Trellis's TrafficPolicy and ExternalService included.
//!
//! Watching is [`trellis_file_watch`]: OS change events (inotify) on the directories that hold
//! the paths, so a change is seen within milliseconds, and a poll every 250 ms as the fallback
//! for what events miss (bind mounts, network filesystems, a path that does not exist yet). Only
//! when the paths' stat fingerprint (every file's mtime/size/inode, recursively for directories)
//! changed is everything reloaded with [`trellis_smi::load::load_paths`]: in-place writes and
//! atomic renames behave the same.
//!
//! Last good version per resource: a resource whose new version has errors keeps its previous
//! version in force and the errors are reported with `file:line`. A file that cannot be parsed at
//! all (the error names no resource) keeps every resource last read from that file. A resource
//! that is gone from the files, with no error naming it, is removed.
//!
//! Every resource in force is given its origin, `file:line` of the document it was read from
//! (the last good version's), so the problems the index finds in it are located too.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use trellis_file_watch::{FileWatch, Options};
use trellis_smi::load::{LoadReport, load_paths};
use trellis_smi::model::{Policy, ResourceId};

use super::{Origin, PolicyProblem, PolicySet, PolicySource};

/// How often the files are looked at without an OS change event (the fallback poll), by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// SMI YAML files and directories, watched.
#[derive(Clone, Debug)]
pub struct FilePolicySource {
    paths: Vec<PathBuf>,
    interval: Duration,
}

impl FilePolicySource {
    /// Watches `paths` (files, or directories read recursively for `*.yaml`/`*.yml`).
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self::with_poll_interval(paths, DEFAULT_POLL_INTERVAL)
    }

    /// Watches `paths`, with `interval` as the fallback poll (OS change events come first).
    pub fn with_poll_interval(paths: Vec<PathBuf>, interval: Duration) -> Self {
        Self { paths, interval }
    }
}

impl PolicySource for FilePolicySource {
    fn name(&self) -> String {
        let paths: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        format!("files:{}", paths.join(","))
    }

    fn watch(&self) -> BoxStream<'static, PolicySet> {
        let (tx, rx) = watch::channel(None::<PolicySet>);
        let paths = self.paths.clone();
        let interval = self.interval;
        tokio::spawn(async move {
            // Before the first load: a change made while loading is seen.
            let mut files = FileWatch::new(paths.clone(), Options::poll(interval));
            let mut kept = LastGood::default();
            loop {
                let set = kept.apply(load_paths(&paths));
                if tx.send(Some(set)).is_err() {
                    return; // every stream dropped
                }
                tokio::select! {
                    () = files.changed() => {}
                    () = tx.closed() => return,
                }
            }
        });
        tokio_stream::wrappers::WatchStream::new(rx)
            .filter_map(|set| async move { set })
            .boxed()
    }
}

/// The last good version of every resource, and where it came from.
#[derive(Debug, Default)]
pub struct LastGood {
    resources: BTreeMap<ResourceId, Kept>,
}

/// A resource in force: the policy, its file (a file that no longer parses keeps what it held)
/// and its origin (`file:line` of the document; kept with a last good version, so a problem the
/// index finds in that version points at where it was read).
#[derive(Clone, Debug)]
struct Kept {
    policy: Policy,
    file: PathBuf,
    origin: Origin,
}

impl LastGood {
    /// Folds a new load into the resources in force and returns the whole set.
    pub fn apply(&mut self, report: LoadReport) -> PolicySet {
        let mut next: BTreeMap<ResourceId, Kept> = BTreeMap::new();
        for loaded in report.resources {
            let origin: Origin = Arc::from(loaded.source.to_string());
            next.insert(
                loaded.policy.id(),
                Kept {
                    policy: loaded.policy,
                    file: loaded.source.file,
                    origin,
                },
            );
        }
        let mut problems = Vec::new();
        let mut unreadable_files: HashMap<PathBuf, ()> = HashMap::new();
        for error in &report.errors {
            let location = match error.line {
                Some(line) => format!("{}:{line}", error.file.display()),
                None => error.file.display().to_string(),
            };
            let message = match &error.field {
                Some(field) => format!("{field}: {}", error.message),
                None => error.message.clone(),
            };
            match &error.resource {
                Some(id) => {
                    let kept = !next.contains_key(id) && self.resources.contains_key(id);
                    if kept {
                        next.insert(id.clone(), self.resources[id].clone());
                    }
                    problems.push(PolicyProblem {
                        resource: id.to_string(),
                        location,
                        message: if kept {
                            format!("{message} (the last good version stays in force)")
                        } else {
                            message
                        },
                    });
                }
                None => {
                    unreadable_files.insert(error.file.clone(), ());
                    problems.push(PolicyProblem {
                        resource: error.file.display().to_string(),
                        location,
                        message,
                    });
                }
            }
        }
        // A document that could not even name its resource: keep what that file held before.
        for (id, kept) in &self.resources {
            if unreadable_files.contains_key(&kept.file) && !next.contains_key(id) {
                next.insert(id.clone(), kept.clone());
            }
        }
        self.resources = next;
        PolicySet {
            policies: self.resources.values().map(|k| k.policy.clone()).collect(),
            origins: self
                .resources
                .iter()
                .map(|(id, k)| (id.clone(), k.origin.clone()))
                .collect(),
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_smi::load::load_str;

    const SPLIT: &str = "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: web, namespace: demo}
spec:
  service: web
  backends:
  - {service: web-v1, weight: 100}
  - {service: web-v2, weight: 0}
";

    fn weights(set: &PolicySet) -> Vec<u64> {
        match &set.policies[..] {
            [Policy::TrafficSplit(s)] => s.backends.iter().map(|b| b.weight.milli()).collect(),
            other => panic!("expected one split, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_new_version_keeps_the_last_good_one_and_reports_file_and_line() {
        let mut kept = LastGood::default();
        let set = kept.apply(load_str("split.yaml", SPLIT));
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(weights(&set), vec![100_000, 0]);

        let bad = SPLIT.replace("weight: 0}", "weight: -5}");
        let set = kept.apply(load_str("split.yaml", &bad));
        assert_eq!(weights(&set), vec![100_000, 0], "last good kept");
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        let problem = &set.problems[0];
        assert_eq!(problem.resource, "TrafficSplit demo/web");
        assert!(problem.location.starts_with("split.yaml:"), "{problem}");
        assert!(problem.message.contains("last good"), "{problem}");
    }

    #[test]
    fn a_bad_new_traffic_policy_keeps_the_last_good_one() {
        let good = "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: demo}
spec:
  targetRef: {name: web}
  fault:
    abort: {httpStatus: 503, percent: 10}
";
        let percent = |set: &PolicySet| match &set.policies[..] {
            [Policy::TrafficPolicy(p)] => {
                p.policy
                    .fault
                    .as_ref()
                    .unwrap()
                    .abort
                    .as_ref()
                    .unwrap()
                    .percent
            }
            other => panic!("expected one TrafficPolicy, got {other:?}"),
        };
        let mut kept = LastGood::default();
        let set = kept.apply(load_str("policy.yaml", good));
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(percent(&set), 10.0);

        let set = kept.apply(load_str(
            "policy.yaml",
            &good.replace("percent: 10", "percent: 150"),
        ));
        assert_eq!(percent(&set), 10.0, "the last good version stays in force");
        assert_eq!(
            set.problems,
            [PolicyProblem {
                resource: "TrafficPolicy demo/web".into(),
                location: "policy.yaml:7".into(),
                message: "spec.fault.abort.percent: 150 is not a percent (0 to 100) (the last good version stays in force)".into(),
            }]
        );
        let set = kept.apply(load_str(
            "policy.yaml",
            &good.replace(
                "    abort:",
                "    delay: {fixed: -1s, percent: 1}\n    abort:",
            ),
        ));
        assert_eq!(percent(&set), 10.0, "a negative duration too");
        assert!(
            set.problems[0].message.contains("is negative"),
            "{:?}",
            set.problems
        );
    }

    #[test]
    fn every_resource_in_force_is_located_at_its_document_a_kept_one_at_its_last_good_version() {
        let origin = |set: &PolicySet, name: &str| {
            let id = ResourceId {
                kind: "TrafficSplit".into(),
                namespace: "demo".into(),
                name: name.into(),
            };
            set.origins.get(&id).map(ToString::to_string)
        };
        let api = SPLIT.replace("name: web,", "name: api,");
        let mut kept = LastGood::default();
        // web starts on line 3 (after a comment and a blank line), api on line 12 (after `---`).
        let set = kept.apply(load_str(
            "dir/splits.yaml",
            &format!("# shop splits\n\n{SPLIT}---\n{api}"),
        ));
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(origin(&set, "web").as_deref(), Some("dir/splits.yaml:3"));
        assert_eq!(origin(&set, "api").as_deref(), Some("dir/splits.yaml:12"));

        // web moves to line 1; api turns bad: its last good version stays, located where it was read.
        let bad_api = api.replace("weight: 0}", "weight: -5}");
        let set = kept.apply(load_str(
            "dir/splits.yaml",
            &format!("{SPLIT}---\n{bad_api}"),
        ));
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        assert_eq!(origin(&set, "web").as_deref(), Some("dir/splits.yaml:1"));
        assert_eq!(origin(&set, "api").as_deref(), Some("dir/splits.yaml:12"));
        assert_eq!(set.origins.len(), set.policies.len());
    }

    #[test]
    fn an_unparseable_file_keeps_its_resources_and_a_deleted_resource_disappears() {
        let mut kept = LastGood::default();
        kept.apply(load_str("split.yaml", SPLIT));
        let set = kept.apply(load_str("split.yaml", "spec: [unclosed"));
        assert_eq!(weights(&set), vec![100_000, 0]);
        assert_eq!(set.problems.len(), 1);
        assert!(
            set.problems[0].location.starts_with("split.yaml"),
            "{:?}",
            set.problems
        );

        let set = kept.apply(load_str("split.yaml", "# emptied\n"));
        assert!(set.policies.is_empty(), "deleted: {:?}", set.policies);
    }

    #[tokio::test]
    async fn the_source_sees_edits_of_a_watched_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("split.yaml");
        std::fs::write(&file, SPLIT).unwrap();
        let source = FilePolicySource::with_poll_interval(
            vec![dir.path().to_owned()],
            Duration::from_millis(20),
        );
        assert!(source.name().starts_with("files:"));
        let mut sets = source.watch();
        let first = sets.next().await.unwrap();
        assert_eq!(weights(&first), vec![100_000, 0]);

        // A different size, so the change shows even on coarse mtimes.
        std::fs::write(
            &file,
            SPLIT
                .replace("weight: 100}", "weight: 1}")
                .replace("weight: 0}", "weight: 99}"),
        )
        .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), sets.next())
            .await
            .expect("edit seen within 5 s")
            .unwrap();
        assert_eq!(weights(&next), vec![1_000, 99_000]);

        std::fs::remove_file(&file).unwrap();
        let gone = tokio::time::timeout(Duration::from_secs(5), sets.next())
            .await
            .expect("deletion seen")
            .unwrap();
        assert!(gone.policies.is_empty());
    }

    #[tokio::test]
    async fn change_events_beat_the_poll() {
        // The poll is an hour: only the OS change events can show these edits in time, both an
        // in-place write and an atomic rename (the way `trellis demo` and editors write).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("split.yaml");
        std::fs::write(&file, SPLIT).unwrap();
        let source = FilePolicySource::with_poll_interval(
            vec![dir.path().to_owned()],
            Duration::from_secs(3600),
        );
        let mut sets = source.watch();
        assert_eq!(weights(&sets.next().await.unwrap()), vec![100_000, 0]);
        std::fs::write(&file, SPLIT.replace("weight: 0}", "weight: 99}")).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(2), sets.next())
            .await
            .expect("an in-place write is seen without waiting for the poll")
            .unwrap();
        assert_eq!(weights(&next), vec![100_000, 99_000]);
        let tmp = dir.path().join("split.tmp");
        std::fs::write(&tmp, SPLIT.replace("weight: 100}", "weight: 7}")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let renamed = tokio::time::timeout(Duration::from_secs(2), sets.next())
            .await
            .expect("an atomic rename is seen without waiting for the poll")
            .unwrap();
        assert_eq!(weights(&renamed), vec![7_000, 0]);
    }
}
