//! Test certificates: a CA, SPIFFE leaves signed by it, and the PEM files plus the `identity:`
//! line of a proxy's static config that name them. Shared by the tests that run proxies under
//! mTLS (mtls.rs, observe.rs, tracing.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A test certificate authority.
pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: Vec<u8>,
}

pub fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

pub fn leaf_params(id: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// A leaf for `id`, valid from `not_before` to `not_after`: (cert PEM, key PEM).
pub fn leaf(ca: &Ca, id: &str, not_before: SystemTime, not_after: SystemTime) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(id, not_before, not_after)
        .signed_by(&key, &ca.issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn valid_leaf(ca: &Ca, id: &str) -> (String, String) {
    let now = SystemTime::now();
    leaf(
        ca,
        id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

/// Write PEM files; returns the `identity:` YAML line naming them.
pub fn identity_yaml(
    dir: &Path,
    name: &str,
    (cert, key): &(String, String),
    anchors: &[&Ca],
) -> String {
    let write = |file: String, text: &str| -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write(format!("{name}.crt"), cert);
    let key = write(format!("{name}.key"), key);
    let anchors: Vec<String> = anchors
        .iter()
        .enumerate()
        .map(|(i, ca)| {
            format!(
                "\"{}\"",
                write(format!("{name}-anchor{i}.crt"), &ca.pem).display()
            )
        })
        .collect();
    format!(
        "identity: {{cert: \"{}\", key: \"{}\", trust_anchors: [{}]}}\n",
        cert.display(),
        key.display(),
        anchors.join(", ")
    )
}
