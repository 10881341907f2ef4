//! The object store: JSON objects per (resource type, namespace, name), one global
//! resourceVersion counter like etcd, a change history for watches that resume from a past
//! version, compaction on demand, and the open watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::resources::{self, ResourceType};
use crate::selector::Selector;
use crate::validation;

/// (resource type id, namespace (empty for cluster-scoped), name).
type ObjectKey = (String, String, String);

/// One write, kept until the next compaction so watches can resume from a past version.
#[derive(Debug)]
struct Change {
    resource_version: u64,
    type_id: String,
    namespace: String,
    event: EventType,
    object: Arc<Value>,
    /// The object before a MODIFIED write: selector watches turn a change in or out of their
    /// selection into ADDED / DELETED, like the real server.
    previous: Option<Arc<Value>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// An open watch: what it selects and where its chunked response is fed.
#[derive(Debug)]
struct Watcher {
    resource: ResourceType,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watcher {
    fn selects(&self, object: &Value) -> bool {
        self.labels.matches_labels(object) && self.fields.matches_fields(object)
    }

    /// The event this watcher sees for `change`, if any.
    fn translate(&self, change: &Change) -> Option<Bytes> {
        if change.type_id != self.resource.id()
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let now = self.selects(&change.object);
        let before = change.previous.as_ref().map(|p| self.selects(p));
        let event = match (change.event, before, now) {
            (EventType::Modified, Some(true), true) => EventType::Modified,
            (EventType::Modified, Some(true), false) => EventType::Deleted,
            (EventType::Modified, _, true) => EventType::Added,
            (EventType::Modified, _, false) => return None,
            (other, _, true) => other,
            (_, _, false) => return None,
        };
        Some(event_line(event.as_str(), &change.object))
    }

    fn bookmark(&self, resource_version: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": resource_version.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version(),
            "metadata": metadata,
        });
        event_line("BOOKMARK", &object)
    }
}

/// One line of a watch response: `{"type":..,"object":..}\n`.
pub(crate) fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{event_type}\",\"object\":").into_bytes();
    // Serializing a serde_json::Value cannot fail.
    serde_json::to_writer(&mut line, object).unwrap_or_default();
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

/// What a LIST asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListRequest {
    pub namespace: Option<String>,
    pub labels: Selector,
    pub fields: Selector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub exact: bool,
}

/// What a WATCH asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct WatchRequest {
    pub namespace: Option<String>,
    pub labels: Selector,
    pub fields: Selector,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
}

/// A watch the server started, for tests that check how a client resumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchStart {
    /// The resource's plural name, e.g. `pods`.
    pub resource: String,
    /// The `resourceVersion` parameter as sent (`None` when absent).
    pub resource_version: Option<String>,
    /// Whether the server answered 410 Gone (the version was compacted).
    pub gone: bool,
}

/// Request counters, for tests and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// LIST requests per resource plural.
    pub lists: BTreeMap<String, u64>,
    /// Every watch started, in order.
    pub watches: Vec<WatchStart>,
}

#[derive(Debug)]
struct Inner {
    types: Vec<ResourceType>,
    resource_version: u64,
    /// Changes at or below this version are forgotten; watches from older versions get 410.
    compacted: u64,
    next_uid: u64,
    /// Counter behind `generateName` suffixes.
    next_generated: u64,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<Change>,
    watchers: Vec<Watcher>,
    stats: Stats,
}

/// The fake server's state. Cheap to share (`Arc<Store>`); every operation takes one short lock.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                types: resources::builtin(),
                resource_version: 1,
                compacted: 0,
                next_uid: 1,
                next_generated: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                watchers: Vec::new(),
                stats: Stats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is one insert).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a resource type known (CRDs, or built-ins beyond the defaults).
    pub fn register(&self, resource: ResourceType) {
        let mut inner = self.lock();
        if !inner.types.contains(&resource) {
            inner.types.push(resource);
        }
    }

    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    /// The type at `group/version/plural`, if registered.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.matches(group, version, plural))
            .cloned()
    }

    /// The current (latest written) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Open watch streams (closed ones are pruned first).
    pub fn watch_count(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|w| !w.tx.is_closed());
        inner.watchers.len()
    }

    pub fn get(
        &self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = (resource.id(), namespace.to_owned(), name.to_owned());
        self.lock()
            .objects
            .get(&key)
            .map(|o| (**o).clone())
            .ok_or_else(|| ApiError::not_found(&resource.kind, name))
    }

    /// POST: creates the object; 409 AlreadyExists if it exists.
    pub fn create(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let object = inner.generate_name(object);
        let (key, object) = prepare(resource, namespace, object)?;
        inner.create_locked(resource, key, object)
    }

    /// PUT: replaces an existing object; 404 if absent, 409 Conflict if the body carries a
    /// resourceVersion that is not the current one (optimistic concurrency).
    pub fn replace(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        object: Value,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let (key, object) = prepare(resource, namespace, object)?;
        if key.2 != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                key.2
            )));
        }
        inner.replace_locked(resource, key, object, true)
    }

    /// JSON merge patch (RFC 7386) of an existing object. Strategic merge patches are applied the
    /// same way (a simplification: lists are replaced, not merged by key).
    pub fn patch(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (
            resource.id(),
            namespace.unwrap_or("").to_owned(),
            name.to_owned(),
        );
        let current = inner
            .objects
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&resource.kind, name))?;
        let mut object = (**current).clone();
        merge_patch(&mut object, patch);
        let (key, object) = prepare(resource, namespace, object)?;
        inner.replace_locked(resource, key, object, false)
    }

    /// Test helper: creates the object or replaces it whatever its resourceVersion.
    pub fn apply(&self, resource: &ResourceType, object: Value) -> Result<Value, ApiError> {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (key, object) = prepare(resource, namespace.as_deref(), object)?;
        let mut inner = self.lock();
        if inner.objects.contains_key(&key) {
            inner.replace_locked(resource, key, object, false)
        } else {
            inner.create_locked(resource, key, object)
        }
    }

    /// DELETE: removes the object; the DELETED event carries the deletion's resourceVersion.
    pub fn delete(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (
            resource.id(),
            namespace.unwrap_or("").to_owned(),
            name.to_owned(),
        );
        let old = inner
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(&resource.kind, name))?;
        Ok(inner.write(key, EventType::Deleted, (*old).clone(), None))
    }

    /// Forgets the history up to the current version, like etcd compaction: watches that resume
    /// from an older version get 410 Gone and must relist. Returns the compacted version.
    pub fn compact(&self) -> u64 {
        let mut inner = self.lock();
        inner.compacted = inner.resource_version;
        inner.history.clear();
        inner.compacted
    }

    /// Sends a BOOKMARK at the current version to every watch that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        let mut inner = self.lock();
        let rv = inner.resource_version;
        inner
            .watchers
            .retain(|w| !w.bookmarks || w.tx.send(w.bookmark(rv, false)).is_ok());
    }

    /// Ends every open watch stream cleanly (what an API server does at a watch timeout or when it
    /// restarts); clients resume from their last seen version.
    pub fn close_watches(&self) {
        self.lock().watchers.clear();
    }

    pub(crate) fn list(
        &self,
        resource: &ResourceType,
        req: &ListRequest,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        *inner
            .stats
            .lists
            .entry(resource.plural.clone())
            .or_default() += 1;
        let (list_rv, after) = match &req.continue_token {
            Some(token) => {
                let (rv, after) = parse_continue(token)?;
                if rv < inner.compacted {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(after))
            }
            None => {
                if let Some(rv) = req
                    .resource_version
                    .as_deref()
                    .filter(|rv| !rv.is_empty() && *rv != "0")
                {
                    let rv = parse_rv(rv)?;
                    if req.exact && rv < inner.compacted {
                        return Err(ApiError::gone(rv, inner.compacted));
                    }
                    if req.exact && rv != inner.resource_version {
                        return Err(ApiError::bad_request(format!(
                            "resourceVersionMatch=Exact for past version {rv} is not supported by the fake API server (current {})",
                            inner.resource_version
                        )));
                    }
                }
                (inner.resource_version, None)
            }
        };
        let type_id = resource.id();
        let start: ObjectKey = match (&after, &req.namespace) {
            (Some((ns, name)), _) => (type_id.clone(), ns.clone(), name.clone()),
            (None, Some(ns)) => (type_id.clone(), ns.clone(), String::new()),
            (None, None) => (type_id.clone(), String::new(), String::new()),
        };
        let limit = req.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last: Option<&ObjectKey> = None;
        let mut more = false;
        for (key, object) in inner.objects.range(start..) {
            if key.0 != type_id || req.namespace.as_ref().is_some_and(|ns| *ns != key.1) {
                break;
            }
            if after
                .as_ref()
                .is_some_and(|(ns, name)| (ns, name) == (&key.1, &key.2))
            {
                continue;
            }
            if !(req.labels.matches_labels(object) && req.fields.matches_fields(object)) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(Arc::clone(object));
            last = Some(key);
        }
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if more && let Some((_, ns, name)) = last {
            metadata["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
        }
        let items: Vec<&Value> = items.iter().map(|o| &**o).collect();
        Ok(json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Starts a watch. A version older than the last compaction gives a stream holding one ERROR
    /// event (410), as a real server does.
    pub(crate) fn watch(
        &self,
        resource: &ResourceType,
        req: WatchRequest,
    ) -> Result<mpsc::UnboundedReceiver<Bytes>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let watcher = Watcher {
            resource: resource.clone(),
            namespace: req.namespace.clone(),
            labels: req.labels.clone(),
            fields: req.fields.clone(),
            bookmarks: req.bookmarks,
            tx,
        };
        let from = req
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty() && *rv != "0")
            .map(parse_rv)
            .transpose()?;
        let gone = !req.send_initial_events && from.is_some_and(|rv| rv < inner.compacted);
        inner.stats.watches.push(WatchStart {
            resource: resource.plural.clone(),
            resource_version: req.resource_version.clone(),
            gone,
        });
        if let (true, Some(rv)) = (gone, from) {
            let status = ApiError::gone(rv, inner.compacted).to_status();
            let _ = watcher.tx.send(event_line("ERROR", &status));
            return Ok(rx);
        }
        match from {
            Some(rv) if !req.send_initial_events => {
                for change in inner.history.iter().filter(|c| c.resource_version > rv) {
                    if let Some(line) = watcher.translate(change) {
                        let _ = watcher.tx.send(line);
                    }
                }
            }
            // No version, "0", or sendInitialEvents: the current state as ADDED events first.
            _ => {
                let type_id = resource.id();
                for ((t, ns, _), object) in inner
                    .objects
                    .range((type_id.clone(), String::new(), String::new())..)
                {
                    if *t != type_id {
                        break;
                    }
                    if req.namespace.as_ref().is_none_or(|want| want == ns)
                        && watcher.selects(object)
                    {
                        let _ = watcher.tx.send(event_line("ADDED", object));
                    }
                }
                if req.send_initial_events {
                    let _ = watcher
                        .tx
                        .send(watcher.bookmark(inner.resource_version, true));
                }
            }
        }
        inner.watchers.push(watcher);
        Ok(rx)
    }
}

impl Inner {
    /// A CustomResourceDefinition written: its served versions become resource types, as a real
    /// server establishes a CRD (versions no longer served stay registered: a simplification).
    fn establish_crd(&mut self, resource: &ResourceType, object: &Value) {
        if resource.group != "apiextensions.k8s.io"
            || resource.plural != "customresourcedefinitions"
        {
            return;
        }
        let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
        let (Some(group), Some(plural), Some(kind)) = (
            text("/spec/group"),
            text("/spec/names/plural"),
            text("/spec/names/kind"),
        ) else {
            return;
        };
        let namespaced = text("/spec/scope") != Some("Cluster");
        let versions = object
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for version in versions {
            let served = version.get("served").and_then(Value::as_bool) == Some(true);
            if let (true, Some(name)) = (served, version.get("name").and_then(Value::as_str)) {
                let established = ResourceType::new(group, name, plural, kind, namespaced);
                if !self.types.contains(&established) {
                    self.types.push(established);
                }
            }
        }
    }

    /// `metadata.generateName` without a name: the prefix and five characters, from the same
    /// alphabet as the real server's (no vowels, no look-alike digits), here from a counter so
    /// names never collide within one server.
    fn generate_name(&mut self, mut object: Value) -> Value {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let prefix = object
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(str::to_owned);
        let named = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if let (Some(prefix), false) = (prefix, named) {
            self.next_generated += 1;
            let mut n = self.next_generated;
            let mut suffix = String::new();
            for _ in 0..5 {
                suffix.push(char::from(ALPHABET[(n % ALPHABET.len() as u64) as usize]));
                n /= ALPHABET.len() as u64;
            }
            metadata_mut(&mut object).insert("name".into(), json!(format!("{prefix}{suffix}")));
        }
        object
    }

    fn create_locked(
        &mut self,
        resource: &ResourceType,
        key: ObjectKey,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        // A real server validates before storage finds a name taken.
        validation::validate(resource, &object, None)?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", resource.kind, key.2),
            ));
        }
        let uid = self.next_uid;
        self.next_uid += 1;
        let meta = metadata_mut(&mut object);
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-0000-0000-{uid:012}")),
        );
        meta.insert(
            "creationTimestamp".into(),
            json!(rfc3339(SystemTime::now())),
        );
        meta.entry("generation").or_insert(json!(1));
        self.establish_crd(resource, &object);
        Ok(self.write(key, EventType::Added, object, None))
    }

    fn replace_locked(
        &mut self,
        resource: &ResourceType,
        key: ObjectKey,
        mut object: Value,
        check_rv: bool,
    ) -> Result<Value, ApiError> {
        let Some(current) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(&resource.kind, &key.2));
        };
        validation::validate(resource, &object, Some(&current))?;
        let sent_rv = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let current_rv = current
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if check_rv && !sent_rv.is_empty() && sent_rv != current_rv {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    resource.plural, key.2
                ),
            ));
        }
        // Server-owned fields survive a replace.
        let meta = metadata_mut(&mut object);
        for field in ["uid", "creationTimestamp", "generation"] {
            if let Some(v) = current.pointer(&format!("/metadata/{field}")) {
                meta.insert(field.into(), v.clone());
            }
        }
        self.establish_crd(resource, &object);
        Ok(self.write(key, EventType::Modified, object, Some(current)))
    }

    /// Stamps the next resourceVersion, stores the object (unless deleted), records the change
    /// and feeds the open watches.
    fn write(
        &mut self,
        key: ObjectKey,
        event: EventType,
        mut object: Value,
        previous: Option<Arc<Value>>,
    ) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(rv.to_string()));
        let object = Arc::new(object);
        if event != EventType::Deleted {
            self.objects.insert(key.clone(), Arc::clone(&object));
        }
        let change = Change {
            resource_version: rv,
            type_id: key.0,
            namespace: key.1,
            event,
            object: Arc::clone(&object),
            previous,
        };
        self.watchers.retain(|w| {
            w.translate(&change)
                .is_none_or(|line| w.tx.send(line).is_ok())
        });
        self.history.push_back(change);
        (*object).clone()
    }
}

/// Validates an object against its URL and fills apiVersion, kind and namespace.
fn prepare(
    resource: &ResourceType,
    namespace: Option<&str>,
    mut object: Value,
) -> Result<(ObjectKey, Value), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(format!(
            "{} body must be a JSON object",
            resource.kind
        )));
    }
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind);
    let meta = metadata_mut(&mut object);
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let body_ns = meta
        .get("namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let ns = if resource.namespaced {
        let ns = match (namespace, body_ns.as_deref()) {
            (Some(url), Some(body)) if url != body => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body}) does not match the namespace sent on the request ({url})"
                )));
            }
            (Some(ns), _) | (None, Some(ns)) => ns.to_owned(),
            (None, None) => "default".to_owned(),
        };
        meta.insert("namespace".into(), json!(ns));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    validation::apply_defaults(resource, &mut object);
    if name.is_empty() {
        // The real server answers with every error of the object, the missing name among them.
        validation::validate(resource, &object, None)?;
        return Err(ApiError::bad_request("metadata.name is required"));
    }
    Ok(((resource.id(), ns, name), object))
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    match object["metadata"].as_object_mut() {
        Some(meta) => meta,
        None => unreachable!("metadata was just made an object"),
    }
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}: not a number")))
}

fn parse_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let mut parts = token.splitn(3, '/');
    let rv = parts
        .next()
        .and_then(|rv| rv.parse().ok())
        .ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_owned();
    let name = parts.next().ok_or_else(bad)?.to_owned();
    Ok((rv, (ns, name)))
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `2026-11-22T00:00:00Z` without a date crate (days-to-civil, Howard Hinnant's algorithm).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_763_769_600 + 3_661);
        assert_eq!(rfc3339(t), "2025-11-22T01:01:01Z");
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(doc, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
