//! The wire format of a UDP tunnel (see the crate docs for the picture): the stream header the
//! calling side writes once, and the length-prefixed datagram frames both sides exchange after
//! it. Everything that parses bytes from a peer lives here, so the fuzzing tests have one place
//! to aim at.

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::LengthDelimitedCodec;

/// The first bytes of every UDP tunnel. `0xFF` first: no TLS record (`0x14`..`0x18`), no
/// HTTP/1 method (a token character) and no HTTP/2 preface (`PRI`) starts with it, so a
/// listener that also takes HTTP and opaque TCP can tell a UDP tunnel by its first byte.
pub const MAGIC: [u8; 4] = [0xFF, b'U', b'D', b'P'];

/// The version of the wire format this crate speaks.
pub const VERSION: u8 = 1;

/// Length of the stream header: magic, version, target port.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 2;

/// Length of a frame's length prefix (u16, big-endian).
pub const LENGTH_PREFIX: usize = 2;

/// The largest datagram a frame can carry: what a u16 length says. It covers every UDP payload
/// (65,507 bytes over IPv4, 65,527 over IPv6 without jumbograms).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// The stream header: which UDP port of the called workload the datagrams are for. The called
/// proxy authorizes the caller for this port (a TrafficTarget's UDPRoute rule names ports) and
/// sends the datagrams to the application on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The application's UDP port on the called side. Never 0.
    pub port: u16,
}

/// Why a stream header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The stream does not start with [`MAGIC`]: not a UDP tunnel.
    #[error("UDP tunnel header, bytes 0..4: {found:02x?} is not the magic {MAGIC:02x?}")]
    BadMagic {
        /// The first four bytes seen.
        found: [u8; 4],
    },
    /// A version this side does not speak.
    #[error(
        "UDP tunnel header, byte 4 (version): {0} is not supported (this side speaks {VERSION})"
    )]
    UnsupportedVersion(u8),
    /// Port 0 names no application port.
    #[error("UDP tunnel header, bytes 5..7 (target port): 0 is not a port")]
    PortZero,
    /// The stream failed or ended before the whole header arrived.
    #[error("UDP tunnel header: {0}")]
    Io(#[from] std::io::Error),
}

impl Header {
    /// The header for datagrams to `port` (which must not be 0; [`Header::parse`] refuses it).
    pub fn new(port: u16) -> Self {
        Header { port }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5..7].copy_from_slice(&self.port.to_be_bytes());
        out
    }

    /// Parse a header from the start of `buf` (for a listener that has already read a prefix
    /// of the stream). `Ok(None)`: `buf` is a correct start but too short yet. Wrong magic is
    /// reported as soon as the first differing byte is there.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
        let seen = buf.len().min(MAGIC.len());
        if buf[..seen] != MAGIC[..seen] {
            let mut found = [0u8; 4];
            found[..seen].copy_from_slice(&buf[..seen]);
            return Err(HeaderError::BadMagic { found });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[4] != VERSION {
            return Err(HeaderError::UnsupportedVersion(buf[4]));
        }
        let port = u16::from_be_bytes([buf[5], buf[6]]);
        if port == 0 {
            return Err(HeaderError::PortZero);
        }
        Ok(Some(Header { port }))
    }

    /// Read exactly the header from `stream` (not a byte more, so the stream can be handed on).
    /// The caller bounds the time it may take.
    pub async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, HeaderError> {
        let mut buf = [0u8; HEADER_LEN];
        // Magic first, so a stranger is refused without waiting for three more bytes.
        stream.read_exact(&mut buf[..MAGIC.len()]).await?;
        Header::parse(&buf[..MAGIC.len()])?;
        stream.read_exact(&mut buf[MAGIC.len()..]).await?;
        // A whole header is either valid or an error; `None` cannot come back.
        Header::parse(&buf)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UDP tunnel v{VERSION} to port {}", self.port)
    }
}

/// The frame codec: a u16 big-endian length, then that many bytes of datagram. Frames longer
/// than `max_datagram` (at most [`MAX_DATAGRAM`]) are an error when decoding (the stream is
/// then closed: a peer that sends them breaks the protocol) and when encoding (callers drop
/// such datagrams before, and count them).
pub fn codec(max_datagram: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u16>()
        .big_endian()
        .max_frame_length(max_datagram.min(MAX_DATAGRAM))
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use proptest::prelude::*;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn a_header_round_trips_and_its_bytes_are_the_documented_ones() {
        let h = Header::new(5353);
        assert_eq!(h.encode(), [0xFF, b'U', b'D', b'P', 1, 0x14, 0xE9]);
        assert_eq!(Header::parse(&h.encode()).unwrap(), Some(h));
        for cut in 0..HEADER_LEN {
            assert_eq!(
                Header::parse(&h.encode()[..cut]).unwrap(),
                None,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bad_headers_say_which_byte_is_wrong() {
        let e = Header::parse(b"GET / HTTP/1.1").unwrap_err();
        assert!(
            matches!(e, HeaderError::BadMagic { found } if &found == b"GET "),
            "{e}"
        );
        assert!(e.to_string().contains("bytes 0..4"), "{e}");
        // A TLS ClientHello is told apart by its first byte alone.
        assert!(matches!(
            Header::parse(&[0x16]),
            Err(HeaderError::BadMagic { .. })
        ));
        let mut v2 = Header::new(53).encode();
        v2[4] = 2;
        assert!(matches!(
            Header::parse(&v2),
            Err(HeaderError::UnsupportedVersion(2))
        ));
        let zero = Header::new(0).encode();
        let e = Header::parse(&zero).unwrap_err();
        assert!(matches!(e, HeaderError::PortZero));
        assert!(e.to_string().contains("bytes 5..7"), "{e}");
    }

    #[tokio::test]
    async fn reading_a_header_leaves_the_first_frame_in_the_stream() {
        let mut bytes = Header::new(9000).encode().to_vec();
        bytes.extend_from_slice(&[0, 2, b'h', b'i']);
        let mut stream = &bytes[..];
        assert_eq!(Header::read(&mut stream).await.unwrap(), Header::new(9000));
        assert_eq!(stream, &[0, 2, b'h', b'i']);
        let mut short = &bytes[..5];
        assert!(matches!(
            Header::read(&mut short).await,
            Err(HeaderError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }

    #[test]
    fn the_codec_frames_with_a_two_byte_big_endian_length_and_refuses_longer_frames() {
        let mut c = codec(1000);
        let mut out = BytesMut::new();
        c.encode(Bytes::from_static(b"abc"), &mut out).unwrap();
        c.encode(Bytes::new(), &mut out).unwrap();
        assert_eq!(&out[..], &[0, 3, b'a', b'b', b'c', 0, 0]);
        assert_eq!(&c.decode(&mut out).unwrap().unwrap()[..], b"abc");
        // An empty datagram is a datagram too.
        assert_eq!(c.decode(&mut out).unwrap().unwrap().len(), 0);
        assert!(c.decode(&mut out).unwrap().is_none());
        assert!(c.encode(Bytes::from(vec![0; 1001]), &mut out).is_err());
        let mut long = BytesMut::from(&[0x03, 0xE9][..]); // announces 1001 bytes
        assert!(c.decode(&mut long).is_err());
        // The default bound is the u16 maximum: a 65,535-byte frame passes.
        let mut c = codec(MAX_DATAGRAM);
        let mut out = BytesMut::new();
        c.encode(Bytes::from(vec![7; MAX_DATAGRAM]), &mut out)
            .unwrap();
        assert_eq!(out.len(), MAX_DATAGRAM + LENGTH_PREFIX);
        assert_eq!(c.decode(&mut out).unwrap().unwrap().len(), MAX_DATAGRAM);
    }

    /// Feed `chunks` to a decoder one after the other, as reads from a stream would, and
    /// collect the frames; stops at the first error (the stream would be closed).
    fn decode_chunks(max: usize, chunks: &[&[u8]]) -> (Vec<Bytes>, bool) {
        let mut c = codec(max);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for chunk in chunks {
            buf.put_slice(chunk);
            loop {
                match c.decode(&mut buf) {
                    Ok(Some(f)) => {
                        assert!(f.len() <= max, "a {}-byte frame under max {max}", f.len());
                        frames.push(f.freeze());
                    }
                    Ok(None) => break,
                    Err(_) => return (frames, true),
                }
            }
        }
        (frames, false)
    }

    proptest! {
        // Brief fuzzing in the normal test run (about a second in a debug build): arbitrary
        // bytes, and valid streams cut anywhere.
        #![proptest_config(ProptestConfig {
            cases: 1000,
            max_shrink_iters: 1000,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic_or_yield_a_frame_over_the_max(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            // Half the time small bytes only, so that lengths are short enough to complete.
            small in any::<bool>(),
            max in prop_oneof![0usize..16, 0usize..=MAX_DATAGRAM],
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..16),
        ) {
            let bytes: Vec<u8> = if small { bytes.iter().map(|b| b % 4).collect() } else { bytes };
            let _ = Header::parse(&bytes);
            let (frames, _) = decode_chunks(max, &cut(&bytes, &cuts));
            prop_assert!(frames.iter().all(|f| f.len() <= max));
        }

        #[test]
        fn valid_frames_cut_at_random_points_reassemble_exactly(
            lengths in proptest::collection::vec(
                prop_oneof![0usize..4, 0usize..1500], 0..12),
            seed in any::<u8>(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..24),
        ) {
            // Contents do not matter to the framing (only lengths are read), so they are a
            // cheap pattern rather than generated byte by byte.
            let datagrams: Vec<Vec<u8>> = lengths
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| seed ^ (i + j) as u8).collect())
                .collect();
            let mut c = codec(MAX_DATAGRAM);
            let mut wire = BytesMut::new();
            for d in &datagrams {
                c.encode(Bytes::copy_from_slice(d), &mut wire).unwrap();
            }
            let (frames, failed) = decode_chunks(MAX_DATAGRAM, &cut(&wire, &cuts));
            prop_assert!(!failed);
            let frames: Vec<Vec<u8>> = frames.iter().map(|f| f.to_vec()).collect();
            prop_assert_eq!(frames, datagrams);
        }
    }

    /// `bytes` cut at the given points, as successive reads from a stream would return it.
    fn cut<'a>(bytes: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([bytes.len()]) {
            chunks.push(&bytes[from..to]);
            from = to;
        }
        chunks
    }
}
