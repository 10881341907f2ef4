//! Live taps: `GET /tap?...` on the admin port streams the records of requests finishing now, as
//! JSON lines, while the client listens.
//!
//! Query parameters (all optional): `direction` (`inbound`|`outbound`), `authority` (exact,
//! case-insensitive), `path` (prefix), `method`, `status` (a class `2xx`..`5xx` or an exact
//! code), `limit` (records, default 100, at most [`MAX_LIMIT`]), `duration` (`10s`, `2m`;
//! default 10 s, at most [`MAX_DURATION`]).
//!
//! Bounds: at most [`MAX_TAPS`] taps at once (others get 429); each has a channel of
//! [`BUFFER`] records and a tap client that reads slower than requests finish loses records
//! (`trellis_tap_dropped_total`), never slowing a request. Only loopback callers may tap (the
//! admin port may listen on 0.0.0.0 in a pod, and records name identities, paths and peers):
//! others get 403 with the reason. Records carry no bodies and no header values other than the
//! trace id and the gRPC status.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;

use super::{Direction, Observe, Record};

/// Taps at once.
pub const MAX_TAPS: usize = 4;
/// Records one tap may ask for.
pub const MAX_LIMIT: usize = 10_000;
/// How long one tap may last.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Records waiting per tap before new ones are dropped.
pub const BUFFER: usize = 256;

/// Too many taps are open.
#[derive(Debug)]
pub struct TooMany;

/// What a tap wants to see.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Only this side.
    pub direction: Option<Direction>,
    /// Only this authority (case-insensitive).
    pub authority: Option<String>,
    /// Only paths starting with this.
    pub path_prefix: Option<String>,
    /// Only this method (case-sensitive, as HTTP methods are).
    pub method: Option<String>,
    /// Only statuses in `[lo, hi]`.
    pub status: Option<(u16, u16)>,
}

impl Filter {
    /// Whether `r` passes.
    pub fn matches(&self, r: &Record) -> bool {
        self.direction.is_none_or(|d| d == r.direction)
            && self
                .authority
                .as_deref()
                .is_none_or(|a| a.eq_ignore_ascii_case(&r.authority))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| r.path.starts_with(p))
            && self.method.as_deref().is_none_or(|m| m == r.method)
            && self
                .status
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&r.status))
    }
}

/// A tap request: its filter and bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct TapRequest {
    /// Which records.
    pub filter: Filter,
    /// How many at most.
    pub limit: usize,
    /// For how long at most.
    pub duration: Duration,
}

/// Parse the query string of `/tap`. Errors say which parameter is wrong.
pub fn parse(query: &str) -> Result<TapRequest, String> {
    let mut t = TapRequest {
        filter: Filter::default(),
        limit: 100,
        duration: Duration::from_secs(10),
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        match &*k {
            "direction" => {
                t.filter.direction = Some(match v {
                    "inbound" => Direction::Inbound,
                    "outbound" => Direction::Outbound,
                    _ => return Err(format!("direction={v}: inbound or outbound")),
                })
            }
            "authority" => t.filter.authority = Some(v.to_string()),
            "path" => t.filter.path_prefix = Some(v.to_string()),
            "method" => t.filter.method = Some(v.to_ascii_uppercase()),
            "status" => t.filter.status = Some(status_range(v)?),
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("limit={v}: a number of records"))?;
                if n == 0 || n > MAX_LIMIT {
                    return Err(format!("limit={v}: between 1 and {MAX_LIMIT}"));
                }
                t.limit = n;
            }
            "duration" => {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("duration={v}: {e} (e.g. 30s, 2m)"))?;
                if d.is_zero() || d > MAX_DURATION {
                    return Err(format!(
                        "duration={v}: more than 0 and at most {}",
                        humantime::format_duration(MAX_DURATION)
                    ));
                }
                t.duration = d;
            }
            other => {
                return Err(format!(
                    "unknown parameter {other} (direction, authority, path, method, status, limit, duration)"
                ));
            }
        }
    }
    Ok(t)
}

fn status_range(v: &str) -> Result<(u16, u16), String> {
    let bad = || format!("status={v}: a class (2xx..5xx) or a code");
    let lower = v.to_ascii_lowercase();
    if let Some(class) = lower.strip_suffix("xx") {
        let c: u16 = class.parse().map_err(|_| bad())?;
        if !(1..=5).contains(&c) {
            return Err(bad());
        }
        return Ok((c * 100, c * 100 + 99));
    }
    let code: u16 = v.parse().map_err(|_| bad())?;
    Ok((code, code))
}

/// Whether `peer` may tap: loopback addresses only (IPv4-mapped IPv6 loopback included).
pub fn allowed(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// What happened to a record offered to a tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued.
    Sent,
    /// Not wanted.
    Filtered,
    /// Wanted, but the tap is behind: dropped.
    Full,
    /// The tap client left.
    Closed,
}

/// One attached tap.
#[derive(Debug)]
pub struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<Arc<Record>>,
}

impl Subscriber {
    /// A subscriber and the receiving end of its channel.
    pub fn new(filter: Filter, buffer: usize) -> (Self, mpsc::Receiver<Arc<Record>>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        (Subscriber { filter, tx }, rx)
    }

    /// Offer `record` without waiting.
    pub fn offer(&self, record: &Arc<Record>) -> Offered {
        if self.tx.is_closed() {
            return Offered::Closed;
        }
        if !self.filter.matches(record) {
            return Offered::Filtered;
        }
        match self.tx.try_send(Arc::clone(record)) {
            Ok(()) => Offered::Sent,
            Err(mpsc::error::TrySendError::Full(_)) => Offered::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Offered::Closed,
        }
    }

    /// The tap client left.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The admin port's body type (whole answers and tap streams).
pub type AdminBody = BoxBody<Bytes, Infallible>;

fn plain(status: StatusCode, text: String) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(Bytes::from(text)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Answer `GET /tap?query` from `peer`: 403 for non-loopback callers, 400 for a bad query, 429
/// when [`MAX_TAPS`] are open, else a stream of JSON lines that ends after `limit` records or
/// `duration`, whichever comes first.
pub fn answer(hub: &Observe, peer: SocketAddr, query: &str) -> Response<AdminBody> {
    if !allowed(peer) {
        return plain(
            StatusCode::FORBIDDEN,
            format!(
                "tap is only served to loopback callers (this caller is {}): run `trellis tap` in the pod, or port-forward the admin port\n",
                peer.ip()
            ),
        );
    }
    let tap = match parse(query) {
        Ok(t) => t,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("tap: {e}\n")),
    };
    let rx = match hub.subscribe(tap.filter, BUFFER) {
        Ok(rx) => rx,
        Err(TooMany) => {
            return plain(
                StatusCode::TOO_MANY_REQUESTS,
                format!("tap: {MAX_TAPS} taps are open already; try again later\n"),
            );
        }
    };
    let deadline = tokio::time::sleep(tap.duration);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .take(tap.limit)
        .take_until(deadline)
        .map(|record| {
            let mut line = Vec::with_capacity(512);
            super::access_log::line(&record, &mut line);
            Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
        });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_tap() {
        assert!(allowed("127.0.0.1:5".parse().unwrap()));
        assert!(allowed("127.3.2.1:5".parse().unwrap()));
        assert!(allowed("[::1]:5".parse().unwrap()));
        assert!(allowed("[::ffff:127.0.0.1]:5".parse().unwrap()));
        assert!(!allowed("10.0.0.7:5".parse().unwrap()));
        assert!(!allowed("[::ffff:10.0.0.7]:5".parse().unwrap()));
        assert!(!allowed("[fe80::1]:5".parse().unwrap()));
    }

    #[test]
    fn queries_parse_with_bounds() {
        let t = parse("direction=inbound&authority=a.b:80&path=/api&method=get&status=5xx&limit=7&duration=3s").unwrap();
        assert_eq!(t.filter.direction, Some(Direction::Inbound));
        assert_eq!(t.filter.method.as_deref(), Some("GET"));
        assert_eq!(t.filter.status, Some((500, 599)));
        assert_eq!(t.limit, 7);
        assert_eq!(t.duration, Duration::from_secs(3));
        assert_eq!(parse("status=404").unwrap().filter.status, Some((404, 404)));
        assert!(parse("limit=0").is_err());
        assert!(parse(&format!("limit={}", MAX_LIMIT + 1)).is_err());
        assert!(parse("duration=1h").is_err());
        assert!(parse("status=9xx").is_err());
        assert!(parse("direction=sideways").is_err());
        assert!(
            parse("colour=red")
                .unwrap_err()
                .contains("unknown parameter colour")
        );
        assert_eq!(parse("").unwrap().limit, 100);
    }
}
