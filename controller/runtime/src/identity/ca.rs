//! The certificate authority itself: checks a set of trust anchors and an issuer (certificate +
//! key) before they are used, and signs workload leaf certificates with the issuer.
//!
//! Every check names what it looked at (a file, a Secret key, "the generated CA") and what is
//! wrong, so an operator can fix it from the message alone: an anchor or issuer that is not a CA,
//! is expired or not yet valid, an issuer key that does not belong to the issuer certificate, an
//! issuer that chains to none of the anchors. The issuer must be an anchor itself or be signed
//! directly by one (no further intermediates): that is all a mesh CA needs and keeps the chain a
//! proxy presents at two certificates.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType, SerialNumber,
};
use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::Pem;

/// Leaves are valid from this long before they are signed, so a peer whose clock is a little
/// behind the controller's accepts a fresh certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

/// Where CA material came from and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {problem}")]
pub struct CaError {
    /// The file, Secret key or "generated CA" the problem is in.
    pub origin: String,
    pub problem: String,
}

impl CaError {
    pub fn new(origin: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            problem: problem.into(),
        }
    }
}

/// PEM text and the place it was read from (for error messages).
#[derive(Clone)]
pub struct PemInput {
    pub origin: String,
    pub pem: Vec<u8>,
}

impl fmt::Debug for PemInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key material never reaches a log.
        f.debug_struct("PemInput")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The raw material of a CA, before it is checked.
#[derive(Clone, Debug)]
pub struct CaMaterial {
    /// One or more PEM inputs, each with one or more CERTIFICATE blocks.
    pub anchors: Vec<PemInput>,
    pub issuer_cert: PemInput,
    pub issuer_key: PemInput,
}

/// A checked CA, ready to sign.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: Vec<u8>,
    issuer_is_anchor: bool,
    issuer_not_after: SystemTime,
    anchors_der: Vec<Vec<u8>>,
    version: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("version", &self.version)
            .field("anchors", &self.anchors_der.len())
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

/// A signed leaf and what the proxy needs with it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the issuer unless the issuer is itself an anchor.
    pub chain_der: Vec<Vec<u8>>,
    pub not_after: SystemTime,
    pub anchors_der: Vec<Vec<u8>>,
    pub version: String,
}

/// Every CERTIFICATE block of `input`, DER.
pub fn certificates(input: &PemInput) -> Result<Vec<Vec<u8>>, CaError> {
    let mut out = Vec::new();
    for (i, block) in Pem::iter_from_buffer(&input.pem).enumerate() {
        let block = block.map_err(|e| {
            CaError::new(
                &input.origin,
                format!("PEM block {} is malformed: {e}", i + 1),
            )
        })?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err(CaError::new(
            &input.origin,
            "no PEM CERTIFICATE block (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(out)
}

fn parse<'a>(der: &'a [u8], origin: &str) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| CaError::new(origin, format!("not an X.509 certificate: {e}")))
}

fn unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

/// A CA certificate usable now: a CA, in its validity window, allowed to sign certificates.
fn check_ca_cert(cert: &X509Certificate<'_>, what: &str, origin: &str) -> Result<(), CaError> {
    let subject = cert.subject().to_string();
    if !cert.is_ca() {
        return Err(CaError::new(
            origin,
            format!("{what} {subject:?} is not a CA certificate (basicConstraints cA is not true)"),
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(CaError::new(
            origin,
            format!(
                "{what} {subject:?} has a keyUsage without keyCertSign: it may not sign certificates"
            ),
        ));
    }
    let now = SystemTime::now();
    let validity = cert.validity();
    if unix(validity.not_after.timestamp()) < now {
        return Err(CaError::new(
            origin,
            format!("{what} {subject:?} expired on {}", validity.not_after),
        ));
    }
    if unix(validity.not_before.timestamp()) > now {
        return Err(CaError::new(
            origin,
            format!(
                "{what} {subject:?} is not valid before {}",
                validity.not_before
            ),
        ));
    }
    Ok(())
}

fn load_key(input: &PemInput) -> Result<KeyPair, CaError> {
    let text = std::str::from_utf8(&input.pem)
        .map_err(|_| CaError::new(&input.origin, "the key file is not PEM text"))?;
    KeyPair::from_pem(text).map_err(|e| {
        let hint = if text.contains("BEGIN RSA PRIVATE KEY") || text.contains("BEGIN EC PRIVATE KEY")
        {
            " (this is a PKCS#1/SEC1 key: convert it with `openssl pkcs8 -topk8 -nocrypt`)"
        } else {
            ""
        };
        CaError::new(
            &input.origin,
            format!(
                "not a usable private key: expected PEM PKCS#8 (-----BEGIN PRIVATE KEY-----) with an ECDSA P-256/P-384, Ed25519 or RSA key{hint}: {e}"
            ),
        )
    })
}

impl Authority {
    /// Checks `material` and builds the signer. Nothing is used unless every check passes.
    pub fn new(material: &CaMaterial) -> Result<Self, CaError> {
        if material.anchors.is_empty() {
            return Err(CaError::new("trust anchors", "no trust anchor given"));
        }
        let mut anchors_der: Vec<Vec<u8>> = Vec::new();
        for input in &material.anchors {
            for der in certificates(input)? {
                check_ca_cert(&parse(&der, &input.origin)?, "trust anchor", &input.origin)?;
                if !anchors_der.contains(&der) {
                    anchors_der.push(der);
                }
            }
        }
        let issuer_origin = &material.issuer_cert.origin;
        let issuer_der = certificates(&material.issuer_cert)?.swap_remove(0);
        let issuer_cert = parse(&issuer_der, issuer_origin)?;
        check_ca_cert(&issuer_cert, "issuer", issuer_origin)?;
        let key = load_key(&material.issuer_key)?;
        if key.subject_public_key_info() != issuer_cert.public_key().raw {
            return Err(CaError::new(
                &material.issuer_key.origin,
                format!(
                    "the key does not match the issuer certificate {issuer_origin} (its public key differs)"
                ),
            ));
        }
        let issuer_is_anchor = anchors_der.contains(&issuer_der);
        if !issuer_is_anchor {
            let signed_by_anchor = anchors_der.iter().any(|der| {
                x509_parser::parse_x509_certificate(der).is_ok_and(|(_, anchor)| {
                    anchor.subject().as_raw() == issuer_cert.issuer().as_raw()
                        && issuer_cert
                            .verify_signature(Some(anchor.public_key()))
                            .is_ok()
                })
            });
            if !signed_by_anchor {
                return Err(CaError::new(
                    issuer_origin,
                    format!(
                        "the issuer {:?} (issued by {:?}) does not chain to any trust anchor: it must be an anchor or be signed directly by one",
                        issuer_cert.subject().to_string(),
                        issuer_cert.issuer().to_string()
                    ),
                ));
            }
        }
        let issuer_not_after = unix(issuer_cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&issuer_der.clone().into(), key).map_err(|e| {
            CaError::new(issuer_origin, format!("cannot sign with this issuer: {e}"))
        })?;
        let mut digest = Sha256::new();
        for der in &anchors_der {
            digest.update(der);
        }
        digest.update(&issuer_der);
        let version = hex::encode(&digest.finalize()[..8]);
        Ok(Self {
            issuer,
            issuer_der,
            issuer_is_anchor,
            issuer_not_after,
            anchors_der,
            version,
        })
    }

    /// Changes whenever the anchors or the issuer change.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn anchors_der(&self) -> &[Vec<u8>] {
        &self.anchors_der
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Signs a leaf for `uri` (the only SAN) with the public key of a checked CSR. The leaf is
    /// valid from [`CLOCK_SKEW`] ago for `lifetime`, never past the issuer's own expiry.
    pub fn sign(
        &self,
        mut csr: rcgen::CertificateSigningRequestParams,
        uri: &str,
        lifetime: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let (mut params, not_after) = self.leaf_params(lifetime);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        // An empty subject (SPIFFE X.509-SVID): rcgen then marks the SAN extension critical.
        params.distinguished_name.remove(DnType::CommonName);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params = params;
        let leaf = csr.signed_by(&self.issuer)?;
        Ok(self.issued(leaf.der().to_vec(), not_after))
    }

    /// Signs the controller's own serving certificate for `names` (DNS names and IP addresses,
    /// the SANs proxies check against the host of their `--controller` URL) with `key`, a key
    /// the controller made for it. serverAuth only: it proves the controller to proxies and
    /// nothing else. Valid from [`CLOCK_SKEW`] ago for `lifetime`, never past the issuer.
    pub fn sign_server(
        &self,
        key: &KeyPair,
        names: &[SanType],
        lifetime: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let (mut params, not_after) = self.leaf_params(lifetime);
        params.subject_alt_names = names.to_vec();
        params
            .distinguished_name
            .push(DnType::CommonName, "trellis controller");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(key, &self.issuer)?;
        Ok(self.issued(leaf.der().to_vec(), not_after))
    }

    /// What every leaf shares: validity, a fresh serial, not a CA, the key usage TLS 1.3 needs.
    fn leaf_params(&self, lifetime: Duration) -> (CertificateParams, SystemTime) {
        let now = SystemTime::now();
        let not_after = (now + lifetime).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        // 16 random bytes, top bit clear: a positive serial, unique per leaf (RFC 5280 4.1.2.2).
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        // TLS 1.3 only signs with the leaf key.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        (params, not_after)
    }

    /// `leaf` with the rest of its chain and the anchors.
    fn issued(&self, leaf: Vec<u8>, not_after: SystemTime) -> Issued {
        let mut chain_der = vec![leaf];
        if !self.issuer_is_anchor {
            chain_der.push(self.issuer_der.clone());
        }
        Issued {
            chain_der,
            not_after,
            anchors_der: self.anchors_der.clone(),
            version: self.version.clone(),
        }
    }
}

/// A fresh anchor and issuer (ECDSA P-256) for local use, valid for a year, as PEM material
/// (so it goes through the same checks as user-given material).
pub fn generate() -> Result<CaMaterial, rcgen::Error> {
    let year = Duration::from_secs(365 * 24 * 3600);
    let now = SystemTime::now();
    let ca_params = |cn: &str, path_len: u8| {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, cn.to_owned());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(path_len));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + year).into();
        params
    };
    let anchor_key = KeyPair::generate()?;
    let anchor_params = ca_params("trellis local trust anchor", 1);
    let anchor = anchor_params.self_signed(&anchor_key)?;
    let anchor_issuer = Issuer::new(anchor_params, anchor_key);
    let issuer_key = KeyPair::generate()?;
    let issuer = ca_params("trellis local issuer", 0).signed_by(&issuer_key, &anchor_issuer)?;
    let generated = "the generated CA".to_owned();
    Ok(CaMaterial {
        anchors: vec![PemInput {
            origin: generated.clone(),
            pem: anchor.pem().into_bytes(),
        }],
        issuer_cert: PemInput {
            origin: generated.clone(),
            pem: issuer.pem().into_bytes(),
        },
        issuer_key: PemInput {
            origin: generated,
            pem: issuer_key.serialize_pem().into_bytes(),
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn input(origin: &str, pem: String) -> PemInput {
        PemInput {
            origin: origin.into(),
            pem: pem.into_bytes(),
        }
    }

    fn ca(cn: &str) -> (CertificateParams, KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    #[test]
    fn the_generated_ca_passes_its_own_checks() {
        let authority = Authority::new(&generate().unwrap()).unwrap();
        assert_eq!(authority.anchors_der().len(), 1);
        assert_eq!(authority.version().len(), 16);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_the_key_file() {
        let (_, _, anchor) = ca("a");
        let (_, other_key, _) = ca("b");
        let err = Authority::new(&CaMaterial {
            anchors: vec![input("anchor.pem", anchor.clone())],
            issuer_cert: input("issuer.pem", anchor),
            issuer_key: input("issuer.key", other_key.serialize_pem()),
        })
        .unwrap_err();
        assert_eq!(err.origin, "issuer.key");
        assert!(err.problem.contains("does not match"), "{err}");
    }

    #[test]
    fn an_issuer_outside_the_anchors_is_refused() {
        let (_, _, anchor) = ca("anchor");
        let (_, key, stranger) = ca("stranger");
        let err = Authority::new(&CaMaterial {
            anchors: vec![input("anchor.pem", anchor)],
            issuer_cert: input("issuer.pem", stranger),
            issuer_key: input("issuer.key", key.serialize_pem()),
        })
        .unwrap_err();
        assert_eq!(err.origin, "issuer.pem");
        assert!(
            err.problem.contains("does not chain to any trust anchor"),
            "{err}"
        );
    }

    #[test]
    fn non_ca_and_expired_certificates_are_refused() {
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let err = Authority::new(&CaMaterial {
            anchors: vec![input("leaf.pem", leaf.clone())],
            issuer_cert: input("leaf.pem", leaf),
            issuer_key: input("leaf.key", key.serialize_pem()),
        })
        .unwrap_err();
        assert!(err.problem.contains("is not a CA certificate"), "{err}");

        let (mut params, key, _) = ca("old");
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let old = params.self_signed(&key).unwrap().pem();
        let err = Authority::new(&CaMaterial {
            anchors: vec![input("old.pem", old.clone())],
            issuer_cert: input("old.pem", old),
            issuer_key: input("old.key", key.serialize_pem()),
        })
        .unwrap_err();
        assert!(err.problem.contains("expired on"), "{err}");
    }

    #[test]
    fn pem_without_certificates_and_foreign_keys_say_what_they_expected() {
        let err = certificates(&input("empty.pem", "hello".into())).unwrap_err();
        assert!(err.problem.contains("BEGIN CERTIFICATE"), "{err}");
        let (_, _, anchor) = ca("a");
        let err = Authority::new(&CaMaterial {
            anchors: vec![input("a.pem", anchor.clone())],
            issuer_cert: input("a.pem", anchor),
            issuer_key: input(
                "k.pem",
                "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n".into(),
            ),
        })
        .unwrap_err();
        assert!(err.problem.contains("openssl pkcs8"), "{err}");
    }
}
