//! `trellis tap`: a live, filtered, bounded stream of the requests (and opaque TCP connections)
//! a proxy finishes, read from its admin port's `/tap` (loopback callers only: run it in the
//! pod, or through a port-forward). One line per record, human or `-o json` (the proxy's JSON
//! lines unchanged). It ends after `--limit` records or `--duration`, whichever comes first.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The proxy's admin address (HOST:PORT).
    #[arg(long, env = "TRELLIS_PROXY_ADMIN", default_value = "127.0.0.1:9901")]
    pub admin: String,
    /// Only `inbound` or `outbound`.
    #[arg(long)]
    pub direction: Option<String>,
    /// Only this authority (e.g. web.shop:80).
    #[arg(long)]
    pub authority: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only this status class (2xx..5xx) or code.
    #[arg(long)]
    pub status: Option<String>,
    /// Stop after this many records (the proxy allows at most 10000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Stop after this long (e.g. 30s, 2m; the proxy allows at most 10m).
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Output: one human line per record, or the JSON lines.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Human,
    Json,
}

impl Args {
    /// The `/tap` query string.
    fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("direction", &self.direction),
            ("authority", &self.authority),
            ("path", &self.path),
            ("method", &self.method),
            ("status", &self.status),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        q.append_pair("limit", &self.limit.to_string());
        q.append_pair("duration", &self.duration);
        q.finish()
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(stream(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn stream(args: &Args) -> anyhow::Result<()> {
    let conn = tokio::net::TcpStream::connect(&args.admin)
        .await
        .with_context(|| format!("connecting to the proxy's admin port {}", args.admin))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .context("HTTP handshake with the admin port")?;
    tokio::spawn(connection);
    let req = http::Request::get(format!("/tap?{}", args.query()))
        .header(http::header::HOST, &args.admin)
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET /tap on {}", args.admin))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "the proxy at {} refused the tap ({status}): {}",
            args.admin,
            String::from_utf8_lossy(&text).trim()
        );
    }
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the tap stream")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1);
            let text = String::from_utf8_lossy(&line[..end]);
            match args.output {
                Output::Json => println!("{text}"),
                Output::Human => match serde_json::from_str::<Value>(&text) {
                    Ok(record) => println!("{}", human(&record)),
                    Err(_) => println!("{text}"),
                },
            }
        }
    }
    Ok(())
}

/// One record as a line: time, direction, what, outcome, size, who, where.
pub fn human(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("");
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let what = if s("protocol") == "tcp" {
        format!("TCP {}", s("authority"))
    } else {
        format!("{} {}{}", s("method"), s("authority"), s("path"))
    };
    let mut outcome = if s("protocol") == "tcp" {
        String::from("closed")
    } else {
        n("status").to_string()
    };
    if let Some(g) = r["grpc_status"].as_u64() {
        outcome += &format!(" grpc={g}");
    }
    if !s("error").is_empty() {
        outcome += &format!(" ({})", s("error"));
    }
    let mut line = format!(
        "{} {:<3} {what} -> {outcome} {:.1}ms in={}B out={}B",
        s("time"),
        if s("direction") == "inbound" {
            "in"
        } else {
            "out"
        },
        r["duration_ms"].as_f64().unwrap_or(0.0),
        n("bytes_in"),
        n("bytes_out"),
    );
    for (label, key) in [
        ("src", "source_identity"),
        ("dst", "destination_identity"),
        ("endpoint", "endpoint"),
        ("trace", "trace_id"),
    ] {
        if !s(key).is_empty() {
            line += &format!(" {label}={}", s(key));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_one_line() {
        let r: Value = serde_json::from_str(
            r#"{"time":"2026-12-06T23:00:00.000Z","trace_id":"","direction":"outbound","protocol":"grpc","source_identity":"spiffe://cluster.local/ns/shop/sa/a","source_workload":"shop/a","destination_identity":"","destination_workload":"","peer":"","authority":"b.shop","method":"POST","path":"/echo.Echo/Say","status":200,"grpc_status":7,"duration_ms":1.25,"bytes_in":10,"bytes_out":0,"endpoint":"10.0.0.2:80","error":""}"#,
        )
        .unwrap();
        assert_eq!(
            human(&r),
            "2026-12-06T23:00:00.000Z out POST b.shop/echo.Echo/Say -> 200 grpc=7 1.2ms in=10B out=0B src=spiffe://cluster.local/ns/shop/sa/a endpoint=10.0.0.2:80"
        );
        let t: Value = serde_json::from_str(
            r#"{"time":"t","direction":"inbound","protocol":"tcp","authority":"127.0.0.1:5432","status":0,"duration_ms":3.0,"bytes_in":5,"bytes_out":7,"error":"connect-failed"}"#,
        )
        .unwrap();
        assert_eq!(
            human(&t),
            "t in  TCP 127.0.0.1:5432 -> closed (connect-failed) 3.0ms in=5B out=7B"
        );
    }

    #[test]
    fn filters_become_the_query() {
        let args = Args {
            admin: "127.0.0.1:9901".into(),
            direction: Some("inbound".into()),
            authority: None,
            path: Some("/api v1".into()),
            method: None,
            status: Some("5xx".into()),
            limit: 5,
            duration: "30s".into(),
            output: Output::Human,
        };
        assert_eq!(
            args.query(),
            "direction=inbound&path=%2Fapi+v1&status=5xx&limit=5&duration=30s"
        );
    }
}
