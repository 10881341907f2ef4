//! Checking a proxy's PKCS#10 certificate signing request before anything is signed.
//!
//! rcgen parses the request and verifies its self-signature (the proxy holds the private key).
//! Then the request may ask for exactly one subject alternative name, the URI of the SPIFFE id
//! the proxy asked for, and must not ask to be a CA. Everything else a CSR may carry (subject,
//! key usages) is ignored: the CA decides those, not the requester. Extensions rcgen does not
//! understand are refused by rcgen itself.

use rcgen::{CertificateSigningRequestParams, IsCa, SanType};

/// Why a CSR was refused (becomes gRPC INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CSR: {0}")]
pub struct CsrError(pub String);

/// Parses `der`, checks its signature and that it asks for `uri` and nothing else.
pub fn check(der: &[u8], uri: &str) -> Result<CertificateSigningRequestParams, CsrError> {
    if der.is_empty() {
        return Err(CsrError("no CSR in the request (csr_der is empty)".into()));
    }
    let csr = CertificateSigningRequestParams::from_der(&der.to_vec().into()).map_err(|e| {
        CsrError(format!(
            "not a usable PKCS#10 request (DER, valid self-signature, only SAN/keyUsage/extKeyUsage/basicConstraints extensions): {e}"
        ))
    })?;
    let sans: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(u) => format!("URI:{}", u.as_str()),
            SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
            SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
            SanType::IpAddress(ip) => format!("IP:{ip}"),
            _ => "otherName".to_owned(),
        })
        .collect();
    if sans != [format!("URI:{uri}")] {
        return Err(CsrError(format!(
            "its subject alternative names must be exactly [URI:{uri}] (the identity asked for), not {sans:?}"
        )));
    }
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CsrError(
            "it asks to be a CA (basicConstraints cA true)".into(),
        ));
    }
    Ok(csr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn csr(sans: Vec<SanType>, ca: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        if ca {
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn exactly_the_asked_uri_passes() {
        assert!(check(&csr(vec![uri(ID)], false), ID).is_ok());
    }

    #[test]
    fn other_or_extra_names_and_ca_requests_are_refused() {
        let other = "spiffe://cluster.local/ns/shop/sa/db";
        let err = check(&csr(vec![uri(other)], false), ID).unwrap_err();
        assert!(err.0.contains(other), "{err}");
        let err = check(
            &csr(
                vec![uri(ID), SanType::DnsName("web".try_into().unwrap())],
                false,
            ),
            ID,
        )
        .unwrap_err();
        assert!(err.0.contains("DNS:web"), "{err}");
        assert!(check(&csr(vec![], false), ID).is_err());
        let err = check(&csr(vec![uri(ID)], true), ID).unwrap_err();
        assert!(err.0.contains("CA"), "{err}");
    }

    #[test]
    fn garbage_and_tampered_requests_are_refused() {
        assert!(check(b"", ID).unwrap_err().0.contains("empty"));
        assert!(check(b"not a csr", ID).is_err());
        let mut der = csr(vec![uri(ID)], false);
        let last = der.len() - 1;
        der[last] ^= 0xff; // breaks the signature
        assert!(check(&der, ID).is_err());
    }
}
