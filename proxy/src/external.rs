//! Destinations outside the mesh that were declared (an ExternalService, or an `external`
//! destination of the file): who may call them, on which ports, and the TLS the proxy originates
//! to them; and, for the transparent path, reading which name a connection to an address the
//! mesh does not know was meant for.
//!
//! Why the **caller's** proxy authorizes: the outside server cannot check mesh identities, and
//! nothing else sits between the workload and it. The proxy checks its own certificate's SPIFFE
//! id against the declaration's list; a proxy without an identity is never allowed (fail safe).
//! The application cannot go around it: its connections are intercepted, and with the egress
//! lockdown an undeclared address is refused.
//!
//! Why a **name** on the transparent path: an outside host's addresses are whatever DNS gave the
//! application (CDNs answer differently per resolver and per minute), so the address says
//! nothing; the name the application used is in its first bytes: the TLS ClientHello's SNI, or
//! the HTTP/1 `Host`. Those bytes are peeked (never consumed), so the connection is then served
//! exactly as if it had been addressed to the name. Only on the ports some declaration lists,
//! since a server-first protocol sends nothing to peek and would wait.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::config::{self, Invalid};
use crate::tls::Alpn;

/// A compiled declaration of an outside destination.
#[derive(Debug)]
pub struct ExternalTable {
    /// `namespace/name` of the declaration (logs).
    pub name: Arc<str>,
    /// SPIFFE ids that may call it.
    allowed: Vec<String>,
    /// `*` was listed: any workload with a mesh identity.
    anyone: bool,
    ports: Vec<config::ExternalPort>,
    /// The host: SNI and certificate name of originated TLS.
    server_name: ServerName<'static>,
    ca_bundle: Option<String>,
}

impl ExternalTable {
    /// Compile `external` of the destination whose key (its host) is `host`; errors name
    /// `field` (`destinations[2].external`).
    pub fn compile(external: &config::External, host: &str, field: &str) -> Result<Self, Invalid> {
        let invalid = |sub: &str, value: &str, message: String| Invalid {
            field: format!("{field}{sub}"),
            value: value.to_string(),
            message,
        };
        if external.ports.is_empty() {
            return Err(invalid(
                ".ports",
                "",
                "no port: an outside destination is reachable only on the ports it declares".into(),
            ));
        }
        for (i, p) in external.ports.iter().enumerate() {
            if external.ports[..i].iter().any(|q| q.port == p.port) {
                return Err(invalid(
                    &format!(".ports[{i}].port"),
                    &p.port.to_string(),
                    format!("port {} is declared twice", p.port),
                ));
            }
        }
        let server_name = ServerName::try_from(host.to_string()).map_err(|e| {
            invalid(
                "",
                host,
                format!("{host:?} is not a host name TLS could be originated to: {e}"),
            )
        })?;
        if external
            .ports
            .iter()
            .any(|p| p.originate_tls_port.is_some())
        {
            // Made now, so a bundle that does not load is refused with its field and the last
            // good entry keeps serving.
            origin_config(external.ca_bundle.as_deref(), Alpn::None)
                .map_err(|e| invalid(".ca_bundle", "", e))?;
        }
        Ok(ExternalTable {
            name: Arc::from(external.name.as_str()),
            anyone: external.allowed_identities.iter().any(|a| a == "*"),
            allowed: external.allowed_identities.clone(),
            ports: external.ports.clone(),
            server_name,
            ca_bundle: external.ca_bundle.clone(),
        })
    }

    /// Whether a proxy whose own SPIFFE id is `own` may call it (None: no identity, never).
    pub fn admits(&self, own: Option<&str>) -> bool {
        own.is_some_and(|id| self.anyone || self.allowed.iter().any(|a| a == id))
    }

    /// Whether a proxy whose own SPIFFE id is `own` may call it on `port`: the port's
    /// declaration, or why not (for the log line).
    pub fn check(&self, own: Option<&str>, port: u16) -> Result<config::ExternalPort, String> {
        if !self.admits(own) {
            return Err(match own {
                Some(id) => format!("ExternalService {} does not allow {id}", self.name),
                None => format!(
                    "this proxy has no mesh identity, and ExternalService {} allows listed identities only",
                    self.name
                ),
            });
        }
        self.port(port)
            .ok_or_else(|| format!("ExternalService {} does not declare port {port}", self.name))
    }

    /// The declaration of `port` (None: not declared, refused).
    pub fn port(&self, port: u16) -> Option<config::ExternalPort> {
        self.ports.iter().find(|p| p.port == port).copied()
    }

    /// The configuration and server name of TLS originated with `alpn`.
    pub fn origin(&self, alpn: Alpn) -> Option<(Arc<ClientConfig>, ServerName<'static>)> {
        // Loaded at compile time already; an error here would be a bundle that loaded once
        // and not again, which cannot happen (the text is the same).
        let config = origin_config(self.ca_bundle.as_deref(), alpn).ok()?;
        Some((config, self.server_name.clone()))
    }
}

/// The upstream authority of an outside endpoint for a call on `port`: the endpoint's host with
/// the port the declaration says (the called one, or the one TLS is originated to).
pub fn endpoint_authority(
    endpoint: &http::uri::Authority,
    port: config::ExternalPort,
) -> Option<http::uri::Authority> {
    let to = port.originate_tls_port.unwrap_or(port.port);
    format!("{}:{to}", endpoint.host()).parse().ok()
}

/// Originated-TLS configurations by (CA bundle, ALPN).
type OriginConfigs = HashMap<(Option<String>, Alpn), Arc<ClientConfig>>;

/// The rustls configuration of originated TLS with `ca_bundle` (PEM; None = the system's roots)
/// and `alpn`, made once per bundle and ALPN (pools and TLS sessions are kept per
/// configuration, so the same one must come back across table generations).
pub fn origin_config(ca_bundle: Option<&str>, alpn: Alpn) -> Result<Arc<ClientConfig>, String> {
    static MADE: LazyLock<Mutex<OriginConfigs>> = LazyLock::new(Mutex::default);
    let key = (ca_bundle.map(str::to_string), alpn);
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(config) = made.get(&key) {
        return Ok(Arc::clone(config));
    }
    let roots = match ca_bundle {
        Some(pem) => roots_of(pem)?,
        None => SYSTEM_ROOTS.clone()?,
    };
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.protocols();
    let config = Arc::new(config);
    made.insert(key, Arc::clone(&config));
    Ok(config)
}

/// The system's trust anchors, loaded once (the error says why none could be).
static SYSTEM_ROOTS: LazyLock<Result<RootCertStore, String>> = LazyLock::new(|| {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "a system root certificate could not be loaded");
    }
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(
            "no system root certificates could be loaded (give the declaration a CA bundle)".into(),
        );
    }
    Ok(roots)
});

/// Trust anchors from PEM text.
fn roots_of(pem: &str) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the CA bundle is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("the CA bundle holds no certificate".into());
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {i} of the CA bundle is not a trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// What the first bytes of a connection say about the name it is meant for.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// The name (lower case, without port or trailing dot).
    Name(String),
    /// More bytes are needed.
    Partial,
    /// No name will come: another protocol, or a ClientHello / request head without one.
    Nameless,
}

/// The largest head read for a name: a ClientHello or request head larger than this is
/// treated as nameless.
const MAX_PEEK: usize = 16 * 1024;

/// The name a client connection is meant for, read without consuming a byte: the TLS
/// ClientHello's SNI, or the HTTP/1 request's `Host`. None when neither came within `wait`.
pub async fn peek_name(stream: &TcpStream, wait: Duration) -> Option<String> {
    let mut buf = vec![0u8; MAX_PEEK];
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if n > seen {
            match name_in(&buf[..n]) {
                Named::Name(name) => return Some(name),
                Named::Nameless => return None,
                Named::Partial if n == buf.len() => return None,
                Named::Partial => seen = n,
            }
        }
        // `peek` answers at once while the bytes already seen are all there is: wait a little
        // for the rest (a ClientHello or head nearly always comes in one segment).
        if tokio::time::Instant::now() + Duration::from_millis(2) > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The name in a connection's first bytes (see [`Named`]).
fn name_in(bytes: &[u8]) -> Named {
    match bytes.first() {
        // A TLS handshake record.
        Some(0x16) => sni_of(bytes),
        Some(_) => host_of(bytes),
        None => Named::Partial,
    }
}

/// The SNI of a ClientHello, read by rustls' own parser (nothing is answered).
fn sni_of(bytes: &[u8]) -> Named {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .server_name()
            .map_or(Named::Nameless, |name| Named::Name(clean(name))),
        Ok(None) => Named::Partial,
        Err(_) => Named::Nameless,
    }
}

/// The `Host` of an HTTP/1 request head.
fn host_of(bytes: &[u8]) -> Named {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|host| trellis_proxy_api::authority::normalize(host).ok())
            .map_or(Named::Nameless, |a| Named::Name(a.name)),
        Ok(httparse::Status::Partial) => Named::Partial,
        Err(_) => Named::Nameless,
    }
}

fn clean(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(sni: Option<&str>) -> Vec<u8> {
        let config = origin_config(Some(&test_ca()), Alpn::Http1).unwrap();
        let name = ServerName::try_from(sni.unwrap_or("192.0.2.1").to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    fn test_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_sni_of_a_client_hello_is_its_name() {
        let bytes = hello(Some("API.Pay.Example"));
        assert_eq!(name_in(&bytes), Named::Name("api.pay.example".into()));
        // Cut short: more is needed, not "nameless".
        assert_eq!(name_in(&bytes[..bytes.len() / 2]), Named::Partial);
        // An IP address is not sent as SNI (RFC 6066): nameless.
        assert_eq!(name_in(&hello(None)), Named::Nameless);
    }

    #[test]
    fn the_host_of_an_http1_head_is_its_name() {
        let head = b"GET /v1/charge HTTP/1.1\r\nHost: API.pay.example:8080\r\naccept: */*\r\n\r\n";
        assert_eq!(name_in(head), Named::Name("api.pay.example".into()));
        assert_eq!(name_in(&head[..20]), Named::Partial);
        assert_eq!(
            name_in(b"GET / HTTP/1.1\r\naccept: */*\r\n\r\n"),
            Named::Nameless
        );
        assert_eq!(name_in(b"SSH-2.0-OpenSSH_9.2\r\n"), Named::Nameless);
    }

    fn external(allowed: &[&str], ports: &[(u16, Option<u16>)]) -> config::External {
        config::External {
            name: "shop/payments".into(),
            allowed_identities: allowed.iter().map(|s| s.to_string()).collect(),
            ports: ports
                .iter()
                .map(|&(port, originate_tls_port)| config::ExternalPort {
                    port,
                    originate_tls_port,
                })
                .collect(),
            ca_bundle: Some(test_ca()),
        }
    }

    #[test]
    fn only_listed_identities_are_admitted_and_no_identity_never() {
        let id = "spiffe://mesh.local/ns/shop/sa/checkout";
        let t = ExternalTable::compile(&external(&[id], &[(443, None)]), "api.pay.example", "e")
            .unwrap();
        assert!(t.admits(Some(id)));
        assert!(!t.admits(Some("spiffe://mesh.local/ns/shop/sa/web")));
        assert!(!t.admits(None));
        let anyone =
            ExternalTable::compile(&external(&["*"], &[(443, None)]), "h.example", "e").unwrap();
        assert!(anyone.admits(Some("spiffe://mesh.local/ns/x/sa/y")));
        assert!(
            !anyone.admits(None),
            "`*` means any mesh identity, not none"
        );
        let nobody =
            ExternalTable::compile(&external(&[], &[(443, None)]), "h.example", "e").unwrap();
        assert!(!nobody.admits(Some(id)));
    }

    #[test]
    fn ports_are_declared_and_originated_tls_goes_to_its_own_port() {
        let t = ExternalTable::compile(
            &external(&["*"], &[(80, Some(443)), (8443, None)]),
            "api.pay.example",
            "e",
        )
        .unwrap();
        assert!(t.port(22).is_none());
        let endpoint: http::uri::Authority = "api.pay.example".parse().unwrap();
        let p80 = t.port(80).unwrap();
        assert_eq!(
            endpoint_authority(&endpoint, p80).unwrap().as_str(),
            "api.pay.example:443"
        );
        let p8443 = t.port(8443).unwrap();
        assert_eq!(
            endpoint_authority(&endpoint, p8443).unwrap().as_str(),
            "api.pay.example:8443"
        );
        assert!(t.origin(Alpn::Http1).is_some());
    }

    #[test]
    fn bad_declarations_are_refused_with_their_field() {
        let e = ExternalTable::compile(
            &external(&["*"], &[]),
            "h.example",
            "destinations[0].external",
        )
        .unwrap_err();
        assert_eq!(e.field, "destinations[0].external.ports");
        let e = ExternalTable::compile(
            &external(&["*"], &[(443, None), (443, None)]),
            "h.example",
            "d",
        )
        .unwrap_err();
        assert_eq!(e.field, "d.ports[1].port");
        let mut bad = external(&["*"], &[(80, Some(443))]);
        bad.ca_bundle = Some("not a certificate".into());
        let e = ExternalTable::compile(&bad, "h.example", "d").unwrap_err();
        assert_eq!(e.field, "d.ca_bundle");
        assert!(e.message.contains("no certificate"), "{}", e.message);
    }
}
