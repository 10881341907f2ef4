//! The plain HTTP/1.1 client the double's API tests talk to it with: one request per connection,
//! so a test sees exactly what was sent and answered.

// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_consul_double::ConsulDouble;

/// A response: status, lower-cased headers, body.
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn index(&self) -> u64 {
        self.headers["x-consul-index"].parse().unwrap()
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One request on a fresh connection (Connection: close), so tests see exactly what was sent.
pub async fn call(
    double: &ConsulDouble,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Resp {
    let mut stream = TcpStream::connect(double.addr()).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let token = token
        .map(|t| format!("X-Consul-Token: {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{token}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}
