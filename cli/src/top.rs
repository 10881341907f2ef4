//! `trellis top`: a live table of workloads by requests per second, with success rate and p99,
//! refreshed every `--interval` from the Prometheus that scrapes the proxies (the same queries
//! as `trellis stat`). On a terminal each frame replaces the last (the screen is cleared); piped,
//! frames follow each other; `--once` prints one frame and exits.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use crate::stat::{self, By, Output, Row};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: stat::Source,
    /// Only this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Time between frames.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// The rate window (a PromQL duration).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// At most this many rows (the busiest).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let query = stat::Args {
        source: args.source.clone(),
        namespace: args.namespace.clone(),
        by: By::Workload,
        window: args.window.clone(),
        output: Output::Table,
    };
    let terminal = std::io::stdout().is_terminal();
    loop {
        let mut rows = runtime.block_on(stat::rows(&query))?;
        let frame = frame(&mut rows, args.limit);
        let mut out = std::io::stdout().lock();
        if terminal && !args.once {
            // Clear the screen and home the cursor (ANSI), so each frame replaces the last.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        if !args.once {
            writeln!(
                out,
                "trellis top: {} every {}, window {} (Ctrl-C to stop)",
                args.source.prometheus,
                humantime::format_duration(args.interval),
                args.window
            )?;
        }
        write!(out, "{frame}")?;
        out.flush()?;
        drop(out);
        if args.once {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(args.interval);
    }
}

/// One frame: the `limit` busiest workloads, busiest first (ties by name, so frames are stable).
pub fn frame(rows: &mut Vec<Row>, limit: usize) -> String {
    rows.sort_by(|a, b| {
        b.requests_per_second
            .total_cmp(&a.requests_per_second)
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    rows.truncate(limit);
    let mut lines = vec![
        ["NAMESPACE", "WORKLOAD", "RPS", "SUCCESS", "P99"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for r in rows.iter() {
        lines.push(vec![
            r.namespace.clone(),
            r.name.clone(),
            format!("{:.1}", r.requests_per_second),
            r.success_rate.map_or("-".into(), |s| format!("{s:.2}%")),
            r.p99_ms.map_or("-".into(), |v| format!("{v:.1}ms")),
        ]);
    }
    align(&lines)
}

/// Cells padded to their column's widest, two spaces apart, no trailing blanks.
pub fn align(lines: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..lines.first().map_or(0, Vec::len))
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_lists_the_busiest_first_within_the_limit() {
        let row = |name: &str, rps: f64| Row {
            namespace: "test".into(),
            name: name.into(),
            requests_per_second: rps,
            success_rate: Some(100.0),
            p99_ms: Some(4.5),
            ..Row::default()
        };
        let mut rows = vec![row("a", 1.0), row("b", 20.0), row("c", 5.0)];
        let text = frame(&mut rows, 2);
        assert_eq!(
            text,
            "NAMESPACE  WORKLOAD  RPS   SUCCESS  P99\n\
             test       b         20.0  100.00%  4.5ms\n\
             test       c         5.0   100.00%  4.5ms\n"
        );
    }
}
