//! The tunnel is any stream: UDP through rustls mutual TLS (TLS 1.3, ring, test CA from
//! rcgen), as between two proxies. The inbound side authorizes by the caller's verified
//! certificate: one caller is allowed, another (with an equally valid certificate) denied.
//! Also measures what the tunnel adds per datagram on the wire (the crate docs quote it).

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_udp::{
    Counters, Header, InboundConfig, Opened, OutboundConfig, Refused, Route, Snapshot, UdpInbound,
};

const ALLOWED: &str = "spiffe://test.local/ns/shop/sa/allowed";
const DENIED: &str = "spiffe://test.local/ns/shop/sa/denied";

struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "udp test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf naming `spiffe_id` (and the DNS name the test's client checks for the server).
    fn leaf(&self, spiffe_id: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(spiffe_id.try_into().unwrap()),
            SanType::DnsName("inbound.test".try_into().unwrap()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        Arc::new(roots)
    }

    fn client(&self, spiffe_id: &str) -> (Arc<ClientConfig>, CertificateDer<'static>) {
        let (cert, key) = self.leaf(spiffe_id);
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(vec![cert.clone()], key)
            .unwrap();
        (Arc::new(config), cert)
    }

    fn server(&self) -> Arc<ServerConfig> {
        let (cert, key) = self.leaf("spiffe://test.local/ns/shop/sa/game");
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .unwrap();
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .unwrap();
        Arc::new(config)
    }
}

/// The called proxy, reduced to its UDP part: terminate mTLS (client certificate required),
/// learn the caller from its verified certificate, let only `ALLOWED` reach the application's
/// port.
async fn tls_inbound(
    pki: &Pki,
    app: SocketAddr,
    identities: Vec<(CertificateDer<'static>, &'static str)>,
) -> (SocketAddr, Arc<UdpInbound>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server());
    let inbound = Arc::new(UdpInbound::new(InboundConfig::default()));
    let served = Arc::clone(&inbound);
    let identities = Arc::new(identities);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, inbound, identities) = (
                acceptor.clone(),
                Arc::clone(&served),
                Arc::clone(&identities),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // The handshake verified the chain; which caller it is comes from the leaf.
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let identity = identities
                    .iter()
                    .find(|(der, _)| *der == leaf)
                    .map(|(_, id)| *id);
                let authorize = |h: Header| match identity {
                    Some(ALLOWED) if h.port == app.port() => Ok(app),
                    _ => Err(Refused::new("forbidden")),
                };
                inbound.serve(tls, authorize, never()).await;
            });
        }
    });
    (addr, inbound)
}

/// The calling proxy's route, reduced: mTLS to the one endpoint with this proxy's certificate.
/// Counts the bytes written on the TCP connection under TLS, and how many of them were the
/// handshake.
struct TlsRoute {
    to: SocketAddr,
    port: u16,
    config: Arc<ClientConfig>,
    written: Arc<AtomicU64>,
    handshake: Arc<AtomicU64>,
}

impl Route for TlsRoute {
    async fn open(&self, _source: SocketAddr) -> Result<Opened, Refused> {
        let tcp = TcpStream::connect(self.to)
            .await
            .map_err(|_| Refused::new("connect-failed"))?;
        tcp.set_nodelay(true).unwrap();
        self.written.store(0, Ordering::SeqCst);
        let counted = CountWrites(tcp, Arc::clone(&self.written));
        let name = ServerName::try_from("inbound.test").unwrap();
        let tls = TlsConnector::from(Arc::clone(&self.config))
            .connect(name, counted)
            .await
            .map_err(|_| Refused::new("tls-failed"))?;
        self.handshake
            .store(self.written.load(Ordering::SeqCst), Ordering::SeqCst);
        Ok(Opened::new(tls, self.port))
    }
}

struct CountWrites<T>(T, Arc<AtomicU64>);

impl<T: AsyncRead + Unpin> AsyncRead for CountWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.1.fetch_add(n as u64, Ordering::SeqCst);
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct Caller {
    addr: SocketAddr,
    counters: Arc<Counters>,
    written: Arc<AtomicU64>,
    handshake: Arc<AtomicU64>,
}

/// A calling side with its own certificate (`config`), towards the inbound at `to`.
async fn caller(config: Arc<ClientConfig>, to: SocketAddr, port: u16) -> Caller {
    let written = Arc::new(AtomicU64::new(0));
    let handshake = Arc::new(AtomicU64::new(0));
    let route = TlsRoute {
        to,
        port,
        config,
        written: Arc::clone(&written),
        handshake: Arc::clone(&handshake),
    };
    let config = OutboundConfig {
        retry_after: Duration::from_secs(30),
        ..OutboundConfig::default()
    };
    let (addr, counters) = start_outbound(route, config).await;
    Caller {
        addr,
        counters,
        written,
        handshake,
    }
}

impl Caller {
    fn snapshot(&self) -> Snapshot {
        self.counters.snapshot()
    }
}

#[tokio::test]
async fn through_mutual_tls_the_allowed_caller_gets_echoes_and_the_denied_one_nothing() {
    let pki = Pki::new();
    let app = echo_app().await;
    // Each calling proxy has its own certificate; the called side learns which is which.
    let (config_a, cert_a) = pki.client(ALLOWED);
    let (config_d, cert_d) = pki.client(DENIED);
    let (inbound_addr, inbound) =
        tls_inbound(&pki, app, vec![(cert_a, ALLOWED), (cert_d, DENIED)]).await;
    let allowed = caller(config_a, inbound_addr, app.port()).await;
    let denied = caller(config_d, inbound_addr, app.port()).await;

    let (a, d) = (client(allowed.addr).await, client(denied.addr).await);
    for size in [64, 1200] {
        let payload = vec![7u8; size];
        assert_eq!(round_trip(&a, &payload).await, payload);
    }
    for _ in 0..3 {
        d.send(b"let me in").await.unwrap();
    }
    assert_eq!(recv_within(&d, Duration::from_millis(300)).await, None);
    // The denied caller's tunnel was opened (its certificate is valid) and closed by the far
    // side after the header; what it carried went nowhere.
    until(
        "denied tunnel closed",
        || denied.snapshot(),
        |s| s.tunnel_failures == 1,
    )
    .await;
    // Its next datagrams are dropped: no new tunnel (handshake) within retry_after.
    d.send(b"again").await.unwrap();
    d.send(b"and again").await.unwrap();
    let od = until("held", || denied.snapshot(), |s| s.dropped_refused == 2).await;
    assert_eq!(recv_within(&d, Duration::from_millis(100)).await, None);
    assert_eq!(od.sent_datagrams, 0, "{od:#?}");
    assert_eq!(od.sessions_opened, 1);
    let i = inbound.counters().snapshot();
    assert_eq!(i.sessions_refused, 1, "{i:#?}");
    assert_eq!(
        i.sessions_opened, 1,
        "only the allowed caller's stream was forwarded"
    );
    assert_eq!(i.sent_datagrams, 2);
    assert_eq!(allowed.snapshot().sent_datagrams, 2);
}

/// What the caller writes on TCP for N datagrams sent one at a time (each waits for its echo,
/// so each is its own flush and TLS record): the header once, then per datagram its 2-byte
/// length and the record's 22 bytes (5 header, 1 content type, 16 AEAD tag in TLS 1.3).
#[tokio::test]
async fn wire_overhead_per_datagram_inside_tls() {
    let pki = Pki::new();
    let app = echo_app().await;
    let (config, cert) = pki.client(ALLOWED);
    let (inbound_addr, _inbound) = tls_inbound(&pki, app, vec![(cert, ALLOWED)]).await;
    let n = 20u64;
    for size in [64usize, 1200] {
        // A caller per size: a session (tunnel, handshake) of its own.
        let c = caller(Arc::clone(&config), inbound_addr, app.port()).await;
        let client = client(c.addr).await;
        for i in 0..n {
            let payload = vec![i as u8; size];
            assert_eq!(round_trip(&client, &payload).await, payload);
        }
        assert_eq!(c.snapshot().sessions_opened, 1, "one tunnel, no resend");
        let handshake = c.handshake.load(Ordering::SeqCst);
        let after = c.written.load(Ordering::SeqCst) - handshake;
        let per_datagram = (after - trellis_udp::wire::HEADER_LEN as u64) as f64 / n as f64;
        println!(
            "{size}-byte datagrams: {per_datagram:.1} bytes written per datagram inside TLS \
             ({:.1} overhead); session: {handshake} bytes of client handshake + {} of header",
            per_datagram - size as f64,
            trellis_udp::wire::HEADER_LEN,
        );
        assert_eq!(
            after,
            trellis_udp::wire::HEADER_LEN as u64 + n * (size as u64 + 2 + 22),
            "{size}-byte datagrams: {after} bytes after the handshake"
        );
    }
}
