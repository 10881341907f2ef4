//! Update benchmark (issue #12, item 3): with N destinations loaded, what one endpoint change
//! costs through the incremental path, next to a whole-table rebuild.
//!
//! Each destination has two backends (`v1` 90 with 3 endpoints, `v2` 10 with 2), a route with a
//! path regex and a header regex splitting 50/50, and the default split. Measured, each run on
//! its own, one thread:
//!
//! - **incremental**: a one-endpoint `EndpointsDelta` through the controller client's
//!   [`apply_update`] (the delta applied to the destination's last good source, that destination
//!   compiled, stored in its slot). Each run changes another destination (round robin), adding an
//!   endpoint the first time, removing it the next.
//! - **of which regexes**: the route's match (path and header regex) compiled alone, the share
//!   of the incremental run that recompiling only the changed backend would save.
//! - **new destination**: the first profile of a key not loaded yet (compile + a copy of the
//!   map of slot pointers), then its `not_found` (another copy).
//! - **whole compile**: `RoutingTable::compile` of the whole configuration with the same
//!   one-endpoint change (the configuration is cloned before the clock starts).
//! - **whole, as before**: what the controller client did for every update before incremental
//!   updates: clone the whole configuration, compile it, publish it (`Shared::apply`, which drops
//!   the previous generation).
//! - **lookup**: the request path's destination lookup on the slot table, next to a plain
//!   `HashMap<String, Arc<DestinationTable>>` (the table's layout before slots), per lookup.
//!
//! Figures: wall-clock latency (median, p99 over the runs), CPU time of the thread
//! (`CLOCK_THREAD_CPUTIME_ID`; median and mean), heap allocations and bytes allocated per run
//! (the system allocator wrapped by `stats_alloc`'s counters; the proxy binary itself runs
//! jemalloc, so absolute times differ a little from the binary's).
//!
//! ```sh
//! cargo bench -p trellis-proxy --bench update  # [-- --destinations 1000 --runs 1000 --rebuilds 30 --lookups 1000000]
//! cargo test -p trellis-proxy --bench update -- --destinations 50 --runs 20 --rebuilds 3   # debug smoke run
//! ```

use std::alloc::System;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use trellis_proxy::authz::PolicyAuthorizer;
use trellis_proxy::config::{self, Config};
use trellis_proxy::controller::apply_update;
use trellis_proxy::state::Shared;
use trellis_proxy::table::{DestinationTable, Lookup, Matcher, RoutingTable, StatsRegistry};
use trellis_proxy_api::v1;

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What one measured run cost.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    allocations: usize,
    bytes: usize,
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Run `f` once under the clocks and the allocation counters; what it returns is dropped after
/// the clocks stop.
fn measure<T>(f: impl FnOnce() -> T) -> Sample {
    let region = Region::new(ALLOCATOR);
    let cpu = thread_cpu();
    let start = Instant::now();
    let result = black_box(f());
    let wall = start.elapsed();
    let cpu = thread_cpu() - cpu;
    let change = region.change();
    drop(result);
    Sample {
        wall,
        cpu,
        allocations: change.allocations + change.reallocations,
        bytes: change.bytes_allocated,
    }
}

/// `--name N` from the command line, else `default`.
fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .rev()
        .find(|w| w[0] == name)
        .map(|w| {
            w[1].parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {:?}", w[1]))
        })
        .unwrap_or(default)
}

fn endpoint(address: String) -> serde_json::Value {
    serde_json::json!({ "address": address })
}

/// Destination `i`: `svc-i.ns-(i%10)`, two backends with 3 and 2 endpoints, one regex route.
fn destination(i: usize) -> config::Destination {
    let ip = |j: usize| format!("10.{}.{}.{}:8080", i / 250, i % 250, j);
    serde_json::from_value(serde_json::json!({
        "authority": format!("svc-{i}.ns-{}", i % 10),
        "routes": [{
            "name": "items",
            "path_regex": "/api/v[0-9]+/items/[^/]+(/.*)?",
            "headers": { "x-canary": "(true|yes|1)" },
            "backends": [{ "name": "v1", "weight": 50 }, { "name": "v2", "weight": 50 }],
        }],
        "backends": [
            { "name": "v1", "weight": 90, "endpoints": (1..=3).map(|j| endpoint(ip(j))).collect::<Vec<_>>() },
            { "name": "v2", "weight": 10, "endpoints": (4..=5).map(|j| endpoint(ip(j))).collect::<Vec<_>>() },
        ],
    }))
    .expect("the bench's destination is valid")
}

/// The endpoint run `r` adds to (or removes from) its destination's `v1`.
fn extra_address(i: usize) -> String {
    format!("10.{}.{}.200:8080", i / 250, i % 250)
}

fn delta(added: Option<String>, removed: Option<String>) -> v1::DestinationUpdate {
    v1::DestinationUpdate {
        version: "bench".into(),
        kind: Some(v1::destination_update::Kind::Delta(v1::EndpointsDelta {
            backends: vec![v1::BackendDelta {
                backend: "v1".into(),
                added: added
                    .map(|address| v1::Endpoint {
                        address,
                        weight: 1,
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                removed: removed.into_iter().collect(),
            }],
        })),
    }
}

/// The proto profile of destination `i` under `key`, as the controller sends it.
fn profile(key: &str, i: usize) -> v1::DestinationUpdate {
    let d = destination(i);
    let endpoints = |b: &config::Backend| {
        b.endpoints
            .iter()
            .map(|e| v1::Endpoint {
                address: e.address.clone(),
                weight: 1,
                ..Default::default()
            })
            .collect()
    };
    let route = &d.routes[0];
    v1::DestinationUpdate {
        version: "bench".into(),
        kind: Some(v1::destination_update::Kind::Profile(
            v1::DestinationProfile {
                authority: key.into(),
                protocol: v1::Protocol::Http as i32,
                routes: vec![v1::HttpRoute {
                    name: route.name.clone(),
                    matches: vec![v1::HttpMatch {
                        path_regex: route.path_regex.clone().unwrap_or_default(),
                        methods: Vec::new(),
                        headers: route.headers.clone().into_iter().collect(),
                    }],
                    backends: route
                        .backends
                        .iter()
                        .map(|b| v1::WeightedRef {
                            name: b.name.clone(),
                            weight: b.weight,
                        })
                        .collect(),
                    policy: None,
                }],
                backends: d
                    .backends
                    .iter()
                    .map(|b| v1::Backend {
                        name: b.name.clone(),
                        weight: b.weight,
                        endpoints: endpoints(b),
                        workload: None,
                    })
                    .collect(),
                ..Default::default()
            },
        )),
    }
}

/// Median, p99 (nearest rank) and mean of `values`.
fn summary(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let rank =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (rank(0.5), rank(0.99), mean)
}

fn row(name: &str, samples: &[Sample]) {
    let us = |f: fn(&Sample) -> Duration| -> Vec<f64> {
        samples.iter().map(|s| f(s).as_secs_f64() * 1e6).collect()
    };
    let (wall_p50, wall_p99, _) = summary(us(|s| s.wall));
    let (cpu_p50, _, cpu_mean) = summary(us(|s| s.cpu));
    let n = samples.len() as f64;
    let allocations = samples.iter().map(|s| s.allocations).sum::<usize>() as f64 / n;
    let kib = samples.iter().map(|s| s.bytes).sum::<usize>() as f64 / n / 1024.0;
    println!(
        "| {name} | {} | {wall_p50:.1} / {wall_p99:.1} | {cpu_p50:.1} / {cpu_mean:.1} | {allocations:.0} | {kib:.1} |",
        samples.len()
    );
}

fn main() {
    let destinations = flag("--destinations", 1000);
    let runs = flag("--runs", 1000);
    let rebuilds = flag("--rebuilds", 30);
    let lookups = flag("--lookups", 1_000_000);
    assert!(destinations > 0 && runs > 0 && rebuilds > 0 && lookups > 0);

    let mut config = Config {
        destinations: (0..destinations).map(destination).collect(),
        ..Default::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let load = Instant::now();
    let shared = Shared::new(&config, &mut registry, Arc::new(PolicyAuthorizer), None)
        .expect("the bench's configuration is valid");
    let loaded = load.elapsed();
    let keys = shared.routes.table.load().destination_keys();
    // Keys in configuration order: destination i is keys_by_index[i].
    let keys_by_index: Vec<String> = config
        .destinations
        .iter()
        .map(|d| {
            trellis_proxy_api::authority::normalize(&d.authority)
                .expect("valid authority")
                .key()
        })
        .collect();
    assert_eq!(keys.len(), destinations);

    // (a) One endpoint through the incremental path, each run on another destination.
    let mut present = vec![false; destinations];
    let mut incremental = Vec::with_capacity(runs);
    for r in 0..runs {
        let i = r % destinations;
        let address = extra_address(i);
        let update = if present[i] {
            delta(None, Some(address))
        } else {
            delta(Some(address), None)
        };
        present[i] = !present[i];
        let key = &keys_by_index[i];
        incremental.push(measure(|| {
            apply_update(&shared, key, update).expect("a valid delta")
        }));
    }
    // Check it did what was measured: a destination changed twice is back to 3 endpoints, once
    // has 4.
    for (i, present) in present.iter().enumerate().take(runs.min(destinations)) {
        let d = shared
            .routes
            .table
            .load()
            .get(&keys_by_index[i])
            .expect("loaded");
        assert_eq!(d.backends[0].endpoints.len(), 3 + usize::from(*present));
    }

    // (a') A key seen for the first time, then gone.
    let mut added = Vec::with_capacity(runs);
    let mut removed = Vec::with_capacity(runs);
    for r in 0..runs.min(200) {
        let key = format!("new-{r}.bench");
        let update = profile(&key, destinations + r);
        added.push(measure(|| {
            apply_update(&shared, &key, update).expect("a valid profile")
        }));
        assert!(shared.routes.table.load().get(&key).is_some());
        let gone = v1::DestinationUpdate {
            version: "bench".into(),
            kind: Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                egress_denied: false,
                external_ports: Vec::new(),
                reason: "bench".into(),
            })),
        };
        removed.push(measure(|| {
            apply_update(&shared, &key, gone).expect("not_found")
        }));
    }

    // What the incremental path spends in the regex engine: the route's one match compiled
    // alone (path and header regex), as many times.
    let route = &config.destinations[0].routes[0];
    let shorthand = config::HttpMatch {
        path_regex: route.path_regex.clone(),
        methods: route.methods.clone(),
        headers: route.headers.clone(),
    };
    let regexes: Vec<Sample> = (0..runs)
        .map(|_| measure(|| Matcher::compile(&shorthand, "bench").expect("valid")))
        .collect();

    // (b) The whole table compiled with the same kind of change; (b') the old controller path.
    let stats = StatsRegistry::default();
    let mut whole = Vec::with_capacity(rebuilds);
    let mut as_before = Vec::with_capacity(rebuilds);
    for r in 0..rebuilds {
        let i = r % destinations;
        let endpoints = &mut config.destinations[i].backends[0].endpoints;
        if endpoints.len() > 3 {
            endpoints.pop();
        } else {
            endpoints.push(config::Endpoint {
                address: extra_address(i),
                identity: None,
                labels: Default::default(),
                weight: 1,
                protocol: None,
            });
        }
        let copy = config.clone();
        whole.push(measure(|| {
            RoutingTable::compile(copy, &stats).expect("valid")
        }));
        as_before.push(measure(|| {
            shared.routes.apply(config.clone()).expect("valid");
        }));
    }

    // (c) Lookups: the slot table against a plain map of the same entries.
    let table = shared.routes.table.load_full();
    let plain: HashMap<String, Arc<DestinationTable>> = keys
        .iter()
        .map(|k| (k.clone(), table.get(k).expect("loaded")))
        .collect();
    let cycle: Vec<&str> = keys.iter().map(String::as_str).collect();
    let slots = Instant::now();
    for n in 0..lookups {
        match table.lookup(black_box(cycle[n % cycle.len()])) {
            Lookup::Found(d) => {
                black_box(d);
            }
            _ => unreachable!("every key is loaded"),
        }
    }
    let slots = slots.elapsed();
    let map = Instant::now();
    for n in 0..lookups {
        black_box(plain.get(black_box(cycle[n % cycle.len()])).map(Arc::clone));
    }
    let map = map.elapsed();

    println!(
        "update benchmark: {destinations} destinations (2 backends, 5 endpoints, 1 regex route each), {} build, {} CPUs",
        if cfg!(debug_assertions) {
            "DEBUG (figures not representative)"
        } else {
            "optimized"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "initial load (whole compile through Shared::new): {:.1} ms",
        loaded.as_secs_f64() * 1e3
    );
    println!();
    println!(
        "| per update | runs | wall us p50 / p99 | CPU us p50 / mean | allocations | KiB allocated |"
    );
    println!("|---|---|---|---|---|---|");
    row(
        "incremental: one-endpoint delta (apply_update)",
        &incremental,
    );
    row(
        "of which regexes: the route's match alone (Matcher::compile)",
        &regexes,
    );
    row("new destination: first profile (apply_update)", &added);
    row("removed destination: not_found (apply_update)", &removed);
    row("whole compile: RoutingTable::compile", &whole);
    row(
        "whole, as before: clone + compile + publish (Shared::apply)",
        &as_before,
    );
    let ratio = |a: &[Sample], b: &[Sample]| {
        let med = |s: &[Sample]| summary(s.iter().map(|s| s.wall.as_secs_f64()).collect()).0;
        med(b) / med(a)
    };
    println!();
    println!(
        "whole compile / incremental (median wall): {:.0}x; whole as before / incremental: {:.0}x",
        ratio(&incremental, &whole),
        ratio(&incremental, &as_before)
    );
    println!(
        "lookup ({lookups} lookups, exact keys): slot table {:.1} ns, plain map of Arc {:.1} ns",
        slots.as_secs_f64() * 1e9 / lookups as f64,
        map.as_secs_f64() * 1e9 / lookups as f64
    );
}
