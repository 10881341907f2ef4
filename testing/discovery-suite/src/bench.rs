//! Generic benchmark runners every adapter's `benches/churn.rs` uses: the time from a registry
//! change to the snapshot that reflects it, and the adapter's memory with many endpoints. Each
//! prints its figures next to a baseline the caller measured in the same run (e.g. the raw registry
//! round trip). These are programs that print, never timed assertions.

use std::fmt;
use std::future::Future;
use std::mem::size_of;
use std::time::{Duration, Instant};

use trellis_discovery::{ChangeDelivery, Endpoint, EndpointPort, ServicePort, Snapshot};

use crate::scenarios::{Ctx, addr};
use crate::{TestInstance, TestRegistry};

/// Percentiles of a set of timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyStats {
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl LatencyStats {
    /// Nearest-rank percentiles of `samples` (all zero when empty).
    pub fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let n = samples.len();
        let rank = |q: f64| -> Duration {
            if n == 0 {
                return Duration::ZERO;
            }
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i]
        };
        let total: Duration = samples.iter().sum();
        Self {
            samples: n,
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples.last().copied().unwrap_or_default(),
            mean: if n == 0 {
                Duration::ZERO
            } else {
                total / n as u32
            },
        }
    }
}

impl fmt::Display for LatencyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}  mean {:>9.3?}  (n={})",
            self.p50, self.p99, self.max, self.mean, self.samples
        )
    }
}

/// Runs `op` `n` times and times each run: the caller's baseline (a raw registry round trip,
/// re-reading a file, ...).
pub async fn time_baseline<F, Fut>(n: usize, mut op: F) -> LatencyStats
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        op(i).await;
        samples.push(start.elapsed());
    }
    LatencyStats::from_samples(samples)
}

/// What [`churn`] measured.
#[derive(Clone, Copy, Debug)]
pub struct ChurnReport {
    /// From the start of the registry write to the watch yielding the snapshot that reflects it.
    pub change_to_snapshot: LatencyStats,
    /// The registry write alone (part of `change_to_snapshot`).
    pub write: LatencyStats,
}

impl ChurnReport {
    /// Prints the figures next to `baseline` (named `baseline_name`), with the p50/p99 ratios.
    pub fn print(&self, adapter: &str, baseline_name: &str, baseline: &LatencyStats) {
        let ratio = |a: Duration, b: Duration| {
            if b.is_zero() {
                f64::NAN
            } else {
                a.as_secs_f64() / b.as_secs_f64()
            }
        };
        println!("churn [{adapter}]");
        println!("  change -> snapshot : {}", self.change_to_snapshot);
        println!("  registry write     : {}", self.write);
        println!("  baseline ({baseline_name}): {baseline}");
        println!(
            "  ratio to baseline  : p50 x{:.2}  p99 x{:.2}",
            ratio(self.change_to_snapshot.p50, baseline.p50),
            ratio(self.change_to_snapshot.p99, baseline.p99)
        );
    }
}

/// Makes `changes` changes to one service (each moves its only instance to a new port) and times
/// each from the start of the registry write to the watch yielding the snapshot with the new port.
/// Panics when a change does not show within the harness's `change_timeout`.
///
/// For polling adapters ([`ChangeDelivery::Poll`]) each change waits first for a pause spread
/// evenly over one poll interval, so changes land at every phase of the poll cycle as real ones do
/// (without it, every change would come right after the poll that delivered the previous one and
/// wait a whole interval).
pub async fn churn(registry: &dyn TestRegistry, changes: usize) -> ChurnReport {
    let ctx = Ctx::new(registry);
    let poll = match ctx.discovery.capabilities().delivery {
        ChangeDelivery::Poll(every) => Some(every),
        ChangeDelivery::Push => None,
    };
    let service = "churn-web";
    let instance = |i: usize| {
        [TestInstance::new(
            "churn-1",
            addr(1),
            10_000 + (i % 50_000) as u16,
        )]
    };
    ctx.put(service, &instance(0)).await;
    let mut watch = ctx.watch(service);
    ctx.wait_instances(&mut watch, service, service, &instance(0), ctx.timeout)
        .await;

    let mut total = Vec::with_capacity(changes);
    let mut writes = Vec::with_capacity(changes);
    for i in 1..=changes {
        if let Some(every) = poll {
            tokio::time::sleep(every.mul_f64(phase(i))).await;
        }
        let start = Instant::now();
        ctx.put(service, &instance(i)).await;
        writes.push(start.elapsed());
        ctx.wait_instances(&mut watch, service, service, &instance(i), ctx.timeout)
            .await;
        total.push(start.elapsed());
    }
    ChurnReport {
        change_to_snapshot: LatencyStats::from_samples(total),
        write: LatencyStats::from_samples(writes),
    }
}

/// The `i`th point of the golden-ratio sequence in [0, 1): evenly spread, deterministic.
fn phase(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

/// What [`memory`] measured.
#[derive(Clone, Copy, Debug)]
pub struct MemoryReport {
    pub endpoints: usize,
    /// Growth of this process's resident set while a fresh adapter built the watch (None where
    /// `/proc/self/status` is unavailable). Includes anything else the process did meanwhile (an
    /// in-process registry double answering, allocator slack), so it is an upper bound.
    pub rss_delta_bytes: Option<i64>,
    /// The in-memory size of the snapshot itself ([`snapshot_heap_bytes`]).
    pub snapshot_bytes: usize,
}

impl MemoryReport {
    /// Prints the figures next to `baseline_bytes` (named `baseline_name`).
    pub fn print(&self, adapter: &str, baseline_name: &str, baseline_bytes: usize) {
        let per = |bytes: f64| bytes / self.endpoints.max(1) as f64;
        println!("memory [{adapter}] with {} endpoints", self.endpoints);
        match self.rss_delta_bytes {
            Some(d) => println!(
                "  RSS growth building the watch: {:>8.2} MiB ({:.0} B/endpoint)",
                d as f64 / MIB,
                per(d as f64)
            ),
            None => println!("  RSS growth building the watch: unavailable (no /proc/self/status)"),
        }
        println!(
            "  snapshot in memory           : {:>8.2} MiB ({:.0} B/endpoint)",
            self.snapshot_bytes as f64 / MIB,
            per(self.snapshot_bytes as f64)
        );
        println!(
            "  baseline ({baseline_name}): {:>8.2} MiB ({:.0} B/endpoint)",
            baseline_bytes as f64 / MIB,
            per(baseline_bytes as f64)
        );
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Registers a service of `endpoints` instances, then measures what a fresh adapter instance costs
/// to hold a watch of it: the process RSS delta around building the watch (until the whole set has
/// arrived), and the snapshot's own size.
pub async fn memory(registry: &dyn TestRegistry, endpoints: usize) -> MemoryReport {
    let service = "memory-web";
    let instances: Vec<TestInstance> = (0..endpoints)
        .map(|i| TestInstance::new(format!("memory-{i}"), addr(i), 8080))
        .collect();
    let writer = Ctx::new(registry);
    writer.put(service, &instances).await;
    drop(writer);

    let before = rss_bytes();
    let ctx = Ctx::new(registry);
    let mut watch = ctx.watch(service);
    let snapshot = ctx
        .wait_instances(&mut watch, service, service, &instances, ctx.timeout * 3)
        .await;
    let after = rss_bytes();
    let report = MemoryReport {
        endpoints,
        rss_delta_bytes: before.zip(after).map(|(b, a)| a as i64 - b as i64),
        snapshot_bytes: snapshot_heap_bytes(&snapshot),
    };
    drop(watch);
    report
}

/// This process's resident set size, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The bytes a snapshot occupies: its structs plus the heap behind its vectors and strings (label
/// maps counted as their keys and values plus one `(String, String)` per entry; B-tree node
/// overhead and the shared source id are not counted).
pub fn snapshot_heap_bytes(snapshot: &Snapshot) -> usize {
    let mut bytes = size_of::<Snapshot>();
    let Snapshot::Endpoints(set) = snapshot else {
        return bytes;
    };
    bytes += set.service.namespace.capacity() + set.service.name.capacity();
    bytes += set.ports.capacity() * size_of::<ServicePort>();
    bytes += set
        .ports
        .iter()
        .map(|p| p.name.as_ref().map_or(0, String::capacity))
        .sum::<usize>();
    bytes += set.endpoints.capacity() * size_of::<Endpoint>();
    bytes += set.endpoints.iter().map(endpoint_heap_bytes).sum::<usize>();
    bytes
}

fn endpoint_heap_bytes(e: &Endpoint) -> usize {
    let ports = e.ports.capacity() * size_of::<EndpointPort>()
        + e.ports
            .iter()
            .map(|p| p.name.as_ref().map_or(0, String::capacity))
            .sum::<usize>();
    let identity = e.identity.namespace.capacity() + e.identity.service_account.capacity();
    let owner = e
        .owner
        .as_ref()
        .map_or(0, |o| o.kind.capacity() + o.name.capacity());
    let labels = e
        .labels
        .iter()
        .map(|(k, v)| k.capacity() + v.capacity() + size_of::<(String, String)>())
        .sum::<usize>();
    let zone = e.zone.as_ref().map_or(0, String::capacity);
    ports + identity + owner + labels + zone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let stats = LatencyStats::from_samples(samples);
        assert_eq!(stats.p50, Duration::from_millis(50));
        assert_eq!(stats.p99, Duration::from_millis(99));
        assert_eq!(stats.max, Duration::from_millis(100));
        assert_eq!(stats.samples, 100);
        assert_eq!(LatencyStats::from_samples(Vec::new()).p99, Duration::ZERO);
    }

    #[test]
    fn phases_spread_over_the_interval() {
        let mut buckets = [0usize; 10];
        for i in 1..=1000 {
            let p = phase(i);
            assert!((0.0..1.0).contains(&p));
            buckets[(p * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|b| (90..=110).contains(b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn rss_is_read_from_proc() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(rss_bytes().expect("VmRSS") > 0);
        }
    }
}
