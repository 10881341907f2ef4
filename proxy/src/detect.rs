//! Protocol detection: from the first bytes a client sends, tell HTTP/2 prior knowledge (the
//! connection preface), HTTP/1 (a request line), a UDP tunnel from another proxy (the
//! `trellis-udp` magic, `FF 55 44 50`) and anything else (opaque bytes).
//!
//! [`detect`] is a pure function over a byte prefix (fuzzed in `proxy/fuzz`); [`read_prefix`]
//! reads until it decides, with a timeout. Server-first protocols (the client waits for the
//! server to speak) send nothing: the timeout classifies them as opaque. The bytes read are
//! replayed to whoever handles the connection ([`PrefixedIo`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use trellis_udp::wire::MAGIC;

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token accepted as HTTP/1.
const MAX_METHOD: usize = 20;
/// Bytes read at most while detecting (enough for the preface and any request-line start).
pub const MAX_DETECT_BYTES: usize = 64;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line starts the connection.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else (including nothing before the timeout).
    Opaque,
    /// A UDP tunnel: the stream starts with [`trellis_udp::wire::MAGIC`] (its header follows;
    /// the listener hands the stream, prefix replayed, to the UDP forwarder).
    UdpTunnel,
}

/// Classify a connection from its first bytes; `None` = not enough bytes to decide yet.
///
/// HTTP/1 is recognised as `METHOD SP` followed by the start of a request target (`/`, `*` or a
/// letter for absolute-form / authority-form), METHOD being 1..=20 upper-case letters.
pub fn detect(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == MAGIC[0] {
        // The whole magic, not its first byte alone: opaque protocols may start with 0xFF
        // (telnet's IAC) and must stay opaque.
        let n = buf.len().min(MAGIC.len());
        return if buf[..n] != MAGIC[..n] {
            Some(Detected::Opaque)
        } else if n == MAGIC.len() {
            Some(Detected::UdpTunnel)
        } else {
            None
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == 0 || method_len > MAX_METHOD {
        return Some(Detected::Opaque);
    }
    match buf.get(method_len) {
        None => None,
        Some(b' ') => match buf.get(method_len + 1) {
            None => None,
            Some(b'/' | b'*') => Some(Detected::Http1),
            Some(b) if b.is_ascii_alphabetic() => Some(Detected::Http1),
            Some(_) => Some(Detected::Opaque),
        },
        Some(_) => Some(Detected::Opaque),
    }
}

/// Read until [`detect`] decides, the peer closes, or `timeout` passes (then opaque).
/// Returns what was read, to be replayed.
pub async fn read_prefix<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(MAX_DETECT_BYTES);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = detect(&buf) {
            return Ok((d, buf.freeze()));
        }
        if buf.len() >= MAX_DETECT_BYTES {
            return Ok((Detected::Opaque, buf.freeze()));
        }
        let mut chunk = [0u8; MAX_DETECT_BYTES];
        let room = MAX_DETECT_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Err(_) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(0)) if buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending anything",
                ));
            }
            Ok(Ok(0)) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// An I/O object that first yields `prefix`, then reads from `inner`; writes go to `inner`.
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> PrefixedIo<T> {
    /// Replay `prefix` before `inner`'s bytes.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        PrefixedIo { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(detect(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"GET"), None);
        assert_eq!(detect(b"GET "), None);
        assert_eq!(
            detect(b"CONNECT web.shop:443 HTTP/1.1"),
            Some(Detected::Http1)
        );
        assert_eq!(
            detect(b"GET http://web.shop/ HTTP/1.1"),
            Some(Detected::Http1)
        );
        assert_eq!(detect(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            detect(b"\x16\x03\x01\x02\x00"),
            Some(Detected::Opaque),
            "TLS client hello"
        );
        assert_eq!(detect(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(detect(b"GET\t/"), Some(Detected::Opaque));
        assert_eq!(detect(b"GET  /"), Some(Detected::Opaque));
        assert_eq!(detect(&[b'A'; 40]), Some(Detected::Opaque));
        assert_eq!(detect(b"PRX"), None, "could still be a method");
        assert_eq!(detect(b"PRX\x00"), Some(Detected::Opaque));
        assert_eq!(detect(b"PRI / HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(detect(b"\xFFUD"), None, "could still be a UDP tunnel");
        assert_eq!(detect(b"\xFFUDP"), Some(Detected::UdpTunnel));
        assert_eq!(
            detect(&trellis_udp::Header::new(53).encode()),
            Some(Detected::UdpTunnel)
        );
        assert_eq!(
            detect(b"\xFF\xFB\x01"),
            Some(Detected::Opaque),
            "telnet IAC WILL ECHO"
        );
    }

    #[tokio::test]
    async fn silence_times_out_as_opaque_and_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (d, prefix) = read_prefix(&mut server, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!((d, prefix.len()), (Detected::Opaque, 0));

        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (d, prefix) = read_prefix(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d, Detected::Http1);
        let mut replay = PrefixedIo::new(prefix, server);
        let mut all = vec![0u8; 18];
        replay.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");
    }
}
