//! A test PKI generated with rcgen: a root CA, a second (untrusted) root, intermediates, and
//! server and client certificates written to PEM files mqsplice can read.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A certificate with its key, able to sign others when it is a CA.
pub struct Issued {
    pub cert: Certificate,
    pub key: KeyPair,
    /// The CAs between this certificate and its root, nearest first (DER and PEM).
    pub chain: Vec<(CertificateDer<'static>, String)>,
    /// Whether this is an intermediate CA (sent along with what it issues).
    pub intermediate: bool,
}

impl Issued {
    /// The certificate's DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Leaf first, then the intermediates: what a client or server presents.
    pub fn full_chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.der())
            .chain(self.chain.iter().map(|(der, _)| der.clone()))
            .collect()
    }

    /// The private key in PKCS#8 DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// Writes `<name>.pem` (chain, leaf first) and `<name>.key` (PKCS#8) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let pem: String = std::iter::once(self.cert.pem())
            .chain(self.chain.iter().map(|(_, pem)| pem.clone()))
            .collect();
        std::fs::write(&cert_path, pem).unwrap();
        std::fs::write(&key_path, self.key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// What a new certificate should look like.
#[derive(Clone)]
pub struct Spec<'a> {
    pub cn: &'a str,
    pub dns: &'a [&'a str],
    pub serial: Option<&'a [u8]>,
    pub ca: bool,
    pub client: bool,
    /// (year, month, day) of not_after; far in the future unless set.
    pub expires: Option<(i32, u8, u8)>,
}

impl<'a> Spec<'a> {
    /// A leaf named `cn`.
    pub fn leaf(cn: &'a str) -> Spec<'a> {
        Spec {
            cn,
            dns: &[],
            serial: None,
            ca: false,
            client: true,
            expires: None,
        }
    }

    /// A CA named `cn`.
    pub fn ca(cn: &'a str) -> Spec<'a> {
        Spec {
            ca: true,
            client: false,
            ..Spec::leaf(cn)
        }
    }
}

fn params(spec: &Spec<'_>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, spec.cn);
    params.subject_alt_names = spec
        .dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().unwrap()))
        .collect();
    if let Some(serial) = spec.serial {
        params.serial_number = Some(SerialNumber::from_slice(serial));
    }
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    if let Some((y, m, d)) = spec.expires {
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    if spec.ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else if spec.client {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    }
    params
}

/// A self-signed root CA.
pub fn root(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = params(&Spec::ca(cn)).self_signed(&key).unwrap();
    Issued {
        cert,
        key,
        chain: Vec::new(),
        intermediate: false,
    }
}

/// A certificate issued by `issuer` with a fresh ECDSA P-256 key.
pub fn issue(issuer: &Issued, spec: &Spec<'_>) -> Issued {
    issue_with_key(issuer, spec, KeyPair::generate().unwrap())
}

/// A certificate issued by `issuer` for `key` (RSA or ECDSA).
pub fn issue_with_key(issuer: &Issued, spec: &Spec<'_>, key: KeyPair) -> Issued {
    let cert = params(spec)
        .signed_by(&key, &issuer.cert, &issuer.key)
        .unwrap();
    // The issuer's own chain, minus its root (a root is never sent).
    let mut chain = Vec::new();
    if issuer.intermediate {
        chain.push((issuer.der(), issuer.cert.pem()));
        chain.extend(issuer.chain.iter().cloned());
    }
    Issued {
        cert,
        key,
        chain,
        intermediate: false,
    }
}

/// The test PKI most tests need, written to a fresh directory.
pub struct Pki {
    pub dir: PathBuf,
    pub root: Issued,
    /// The server certificate (CN and DNS `localhost`, IP 127.0.0.1), issued by `root`.
    pub server: Issued,
    /// `client_ca` for mqsplice: the root.
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// A root CA and a server certificate for localhost in a new temporary directory.
    pub fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "mqsplice-pki-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let root = root("mqsplice test root");
        let server = issue(
            &root,
            &Spec {
                dns: &["localhost"],
                client: false,
                ..Spec::leaf("localhost")
            },
        );
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, root.cert.pem()).unwrap();
        let (server_cert, server_key) = server.write(&dir, "server");
        Pki {
            dir,
            root,
            server,
            ca_path,
            server_cert,
            server_key,
        }
    }

    /// A client certificate issued by the root.
    pub fn client(&self, spec: &Spec<'_>) -> Issued {
        issue(&self.root, spec)
    }

    /// A client certificate with `n` intermediate CAs between it and the root.
    pub fn client_via(&self, n: usize, spec: &Spec<'_>) -> Issued {
        let mut issuer: Option<Issued> = None;
        for i in 0..n {
            let name = format!("intermediate {i}");
            let parent = issuer.as_ref().unwrap_or(&self.root);
            let next = intermediate(parent, &name);
            issuer = Some(next);
        }
        issue(issuer.as_ref().unwrap_or(&self.root), spec)
    }

    /// The trust store a client needs to verify mqsplice's certificate.
    pub fn client_roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.der()).unwrap();
        roots
    }

    /// A rustls client configuration trusting the root, presenting `identity` if given,
    /// offering ALPN `mqtt`.
    pub fn client_config(&self, identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        client_config(
            self.client_roots(),
            identity,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }
}

impl Pki {
    /// A rustls client configuration trusting the root, without a certificate, offering
    /// exactly the ALPN names `alpn` (a browser offers `http/1.1`).
    pub fn client_config_alpn(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        let mut config = Arc::unwrap_or_clone(self.client_config(None));
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// An intermediate CA issued by `parent`.
pub fn intermediate(parent: &Issued, cn: &str) -> Issued {
    Issued {
        intermediate: true,
        ..issue(parent, &Spec::ca(cn))
    }
}

/// A rustls client configuration (aws-lc-rs) for `versions`, trusting `roots`.
pub fn client_config(
    roots: rustls::RootCertStore,
    identity: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.full_chain(), id.key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Arc::new(config)
}
