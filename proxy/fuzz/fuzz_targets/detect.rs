//! Fuzz protocol detection: never panics, and its answers are consistent with the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::detect::{Detected, H2_PREFACE, detect};

fuzz_target!(|data: &[u8]| {
    match detect(data) {
        Some(Detected::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Detected::Http1) => assert!(data[0].is_ascii_uppercase()),
        None => {
            // Undecided only on a strict prefix of something decidable: one more byte decides
            // or keeps it open, and never for longer than the preface or a method + space.
            assert!(
                data.len() < H2_PREFACE.len(),
                "undecided after {} bytes",
                data.len()
            );
        }
        Some(Detected::UdpTunnel) => assert!(data.starts_with(b"\xFFUDP")),
        Some(Detected::Opaque) => {}
    }
    // Every prefix of a decided input is undecided or decides the same way.
    if let Some(d) = detect(data) {
        for end in 1..data.len() {
            if let Some(p) = detect(&data[..end]) {
                assert_eq!(p, d, "prefix of length {end} decided differently");
            }
        }
    }
});
