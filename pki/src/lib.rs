//! The federation's public-key infrastructure: one CA, certificates for
//! nodes, the coordinator and people, and how a peer's identity is read back.
//!
//! Key decision: a certificate carries its holder's identity in its subject:
//! the common name is the holder's id (`chonnam`, `coordinator`, `alice`), the
//! organisational unit is the holder's [`Role`] and the organisation names the
//! institution. Every gRPC connection in the federation is mutual TLS against
//! the federation CA, so once the handshake succeeds the server reads the
//! caller's role straight from its certificate: there is no second identity
//! system to keep in step with the first.
//!
//! Keys are ECDSA P-256, which every TLS stack accepts.

#![forbid(unsafe_code)]

pub mod readiness;
pub mod signed;
pub mod transport;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};

/// Everything that can go wrong creating, loading or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key or certificate")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("peer presented no client certificate")]
    NoPeerCertificate,
    #[error("peer certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("peer certificate has no {0} in its subject")]
    MissingSubjectField(&'static str),
    #[error(
        "unknown role `{0}`; expected one of coordinator, node, requester, committee, auditor, node-admin"
    )]
    UnknownRole(String),
    #[error("invalid name `{0}`: use 1-63 lowercase letters, digits and '-'")]
    InvalidName(String),
    #[error("unusable certificate signing request: {0}")]
    Request(String),
    #[error("the certificate is not one the federation CA issued and still vouches for: {0}")]
    Untrusted(String),
}

/// What a certificate holder may do in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The G-Health coordinator service.
    Coordinator,
    /// A hospital node.
    Node,
    /// A startup or researcher who submits studies.
    Requester,
    /// A steering committee member who approves studies.
    Committee,
    /// Someone who may read audit trails.
    Auditor,
    /// Hospital IT administering a node's registration.
    NodeAdmin,
    /// A service registered to receive residents' own records through the
    /// exchange (e.g. the personal health report service).
    Recipient,
}

impl Role {
    /// The spelling used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Requester => "requester",
            Role::Committee => "committee",
            Role::Auditor => "auditor",
            Role::NodeAdmin => "node-admin",
            Role::Recipient => "recipient",
        }
    }

    /// Services (which accept connections) need server authentication too.
    fn is_service(self) -> bool {
        matches!(self, Role::Coordinator | Role::Node)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "coordinator" => Role::Coordinator,
            "node" => Role::Node,
            "requester" => Role::Requester,
            "committee" => Role::Committee,
            "auditor" => Role::Auditor,
            "node-admin" => Role::NodeAdmin,
            "recipient" => Role::Recipient,
            other => return Err(Error::UnknownRole(other.to_owned())),
        })
    }
}

/// Who is on the other end of a verified mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's common name: a node id, `coordinator`, or a user name.
    pub name: String,
    pub role: Role,
    /// The institution, e.g. "Chosun University Hospital".
    pub organisation: String,
    /// The address the connection came from, when served over TCP.
    pub source: Option<std::net::SocketAddr>,
}

impl PeerIdentity {
    /// Reads the identity from the leaf certificate of a verified chain.
    pub fn from_chain(chain: &[impl AsRef<[u8]>]) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(Error::NoPeerCertificate)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| Error::Parse(e.to_string()))?;
        let subject = cert.subject();
        let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
        };
        let name =
            first(&mut subject.iter_common_name()).ok_or(Error::MissingSubjectField("CN"))?;
        let role = first(&mut subject.iter_organizational_unit())
            .ok_or(Error::MissingSubjectField("OU (role)"))?
            .parse()?;
        let organisation = first(&mut subject.iter_organization()).unwrap_or_default();
        Ok(PeerIdentity {
            name,
            role,
            organisation,
            source: None,
        })
    }

    /// Reads the identity of the caller of a gRPC request served over mTLS.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Self, Error> {
        if let Some(peer) = request.extensions().get::<transport::Peer>() {
            return Ok(PeerIdentity {
                source: peer.addr,
                ..Self::from_chain(&peer.certs)?
            });
        }
        let chain = request.peer_certs().ok_or(Error::NoPeerCertificate)?;
        Ok(PeerIdentity {
            source: request.remote_addr(),
            ..Self::from_chain(&chain)?
        })
    }
}

/// Checks that `cert_pem` was issued by the federation CA (`ca_pem`) and is
/// valid now, as mTLS would; returns who it names. The committee uses it to
/// trust the certificate that verifies an exported audit log's checkpoints.
pub fn verify_member(ca_pem: &str, cert_pem: &str) -> Result<PeerIdentity, Error> {
    verify_member_at(ca_pem, cert_pem, rustls::pki_types::UnixTime::now())
}

/// [`verify_member`] as of `at`.
fn verify_member_at(
    ca_pem: &str,
    cert_pem: &str,
    at: rustls::pki_types::UnixTime,
) -> Result<PeerIdentity, Error> {
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pem_der(ca_pem)?))
        .map_err(|e| Error::Untrusted(format!("unusable CA certificate: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| Error::Untrusted(e.to_string()))?;
    let leaf = pem_der(cert_pem)?;
    verifier
        .verify_client_cert(&CertificateDer::from(leaf.clone()), &[], at)
        .map_err(|e| Error::Untrusted(e.to_string()))?;
    PeerIdentity::from_chain(&[leaf])
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print private keys.
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

/// The federation CA: signs every certificate in the federation.
pub struct CertificateAuthority {
    material: CertifiedKey,
    issuer: Issuer<'static, KeyPair>,
}

/// What a new certificate should say.
#[derive(Debug, Clone)]
pub struct CertificateRequest {
    /// Common name: node id, `coordinator`, or a user name.
    pub name: String,
    pub role: Role,
    pub organisation: String,
    /// DNS names and IP addresses a service is reached at (ignored for people).
    pub hosts: Vec<String>,
    pub valid_for: Duration,
}

impl CertificateRequest {
    /// A request with the defaults: reachable on loopback, valid for a year.
    pub fn new(name: &str, role: Role, organisation: &str) -> Self {
        CertificateRequest {
            name: name.to_owned(),
            role,
            organisation: organisation.to_owned(),
            hosts: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            valid_for: Duration::days(365),
        }
    }
}

impl CertificateAuthority {
    /// Creates a new CA valid for ten years.
    pub fn create(federation: &str) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{federation} federation CA"));
        dn.push(DnType::OrganizationName, federation);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let material = CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(CertificateAuthority {
            material,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(material: CertifiedKey) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&material.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&material.cert_pem, key)?;
        Ok(CertificateAuthority { material, issuer })
    }

    /// The CA certificate, which every member of the federation trusts.
    pub fn cert_pem(&self) -> &str {
        &self.material.cert_pem
    }

    /// The CA's own certificate and key, for writing to disk.
    pub fn material(&self) -> &CertifiedKey {
        &self.material
    }

    /// Issues a certificate signed by this CA, for a new key pair.
    pub fn issue(&self, request: &CertificateRequest) -> Result<CertifiedKey, Error> {
        self.issue_for(request, KeyPair::generate()?)
    }

    /// Issues a renewed certificate: same holder, role, organisation and
    /// hosts as `current` (which this CA must have issued), valid from now
    /// for `valid_for`, for the same key unless `new_key`. Keeping the key
    /// keeps every audit checkpoint the holder signed verifiable with the
    /// renewed certificate.
    pub fn renew(
        &self,
        current: &CertifiedKey,
        valid_for: Duration,
        new_key: bool,
    ) -> Result<CertifiedKey, Error> {
        // This CA must have issued it; it may have expired since (checked
        // as of when it became valid).
        let (not_before, _) = readiness::validity(&current.cert_pem)?;
        let issued = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(not_before.unix_timestamp()).unwrap_or(0) + 60,
        ));
        let holder = verify_member_at(self.cert_pem(), &current.cert_pem, issued)?;
        let mut request = CertificateRequest::new(&holder.name, holder.role, &holder.organisation);
        request.hosts = subject_alt_names(&current.cert_pem)?
            .into_iter()
            .filter(|h| *h != holder.name)
            .collect();
        request.valid_for = valid_for;
        let key = if new_key {
            KeyPair::generate()?
        } else {
            KeyPair::from_pem(&current.key_pem)?
        };
        self.issue_for(&request, key)
    }

    fn issue_for(&self, request: &CertificateRequest, key: KeyPair) -> Result<CertifiedKey, Error> {
        let cert = Self::params_for(request)?.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Renews `current` (a certificate this CA issued, presented by its
    /// holder over mTLS) for the key in `csr_pem`, whose signature proves
    /// the holder has it: same holder, role, organisation and hosts as
    /// `current`, valid from now for `valid_for`. Nothing but the public key
    /// is taken from the request. Returns the certificate (PEM).
    pub fn renew_request(
        &self,
        current_pem: &str,
        csr_pem: &str,
        valid_for: Duration,
    ) -> Result<String, Error> {
        let holder = verify_member(self.cert_pem(), current_pem)?;
        let mut request = CertificateRequest::new(&holder.name, holder.role, &holder.organisation);
        request.hosts = subject_alt_names(current_pem)?
            .into_iter()
            .filter(|h| *h != holder.name)
            .collect();
        request.valid_for = valid_for;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Request(e.to_string()))?;
        csr.params = Self::params_for(&request)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    fn params_for(request: &CertificateRequest) -> Result<CertificateParams, Error> {
        validate_name(&request.name)?;
        let hosts = if request.role.is_service() {
            let mut hosts = request.hosts.clone();
            if !hosts.contains(&request.name) {
                hosts.push(request.name.clone());
            }
            hosts
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(hosts)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.name.as_str());
        dn.push(DnType::OrganizationalUnitName, request.role.as_str());
        dn.push(DnType::OrganizationName, request.organisation.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if request.role.is_service() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + request.valid_for;
        Ok(params)
    }
}

/// A certificate signing request (PEM) for the key `key_pem`, as a holder
/// sends it to renew its certificate; the issuer takes only the key.
pub fn signing_request(name: &str, key_pem: &str) -> Result<String, Error> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Encodes `der` as a PEM certificate.
pub fn certificate_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn pem_der(pem: &str) -> Result<Vec<u8>, Error> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, doc)| doc.contents)
        .map_err(|e| Error::Parse(e.to_string()))
}

/// The DNS names and IP addresses a certificate names.
fn subject_alt_names(cert_pem: &str) -> Result<Vec<String>, Error> {
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::Parse(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes"))
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes"))
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

/// Where a federation member's TLS files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate.
    pub ca: PathBuf,
    /// This member's certificate.
    pub cert: PathBuf,
    /// This member's private key.
    pub key: PathBuf,
}

/// Loaded TLS material: the CA to trust and the identity to present.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: String,
    identity: CertifiedKey,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

impl TlsMaterial {
    pub fn new(ca_pem: String, identity: CertifiedKey) -> Self {
        TlsMaterial { ca_pem, identity }
    }

    /// This member's own certificate and key (the key also signs its audit
    /// checkpoints).
    pub fn identity(&self) -> &CertifiedKey {
        &self.identity
    }

    /// Reads the CA certificate, certificate and key from files.
    pub fn load(files: &TlsFiles) -> Result<Self, Error> {
        let read = |what, path: &Path| {
            fs::read_to_string(path).map_err(|source| Error::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(TlsMaterial {
            ca_pem: read("the federation CA certificate", &files.ca)?,
            identity: CertifiedKey {
                cert_pem: read("the certificate", &files.cert)?,
                key_pem: read("the private key", &files.key)?,
            },
        })
    }

    /// Client side: trust only the federation CA, expect the server to be
    /// `server_name`, and present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(TlsIdentity::from_pem(
                &self.identity.cert_pem,
                &self.identity.key_pem,
            ))
            .domain_name(server_name)
    }
}

/// A directory of PKI files named `ca.pem`, `ca.key`, `<name>.pem`, `<name>.key`.
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PkiDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files a member named `name` uses for mTLS.
    pub fn tls_files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.root.join("ca.pem"),
            cert: self.root.join(format!("{name}.pem")),
            key: self.root.join(format!("{name}.key")),
        }
    }

    /// Creates a new CA and writes it; refuses to overwrite an existing one.
    pub fn init(&self, federation: &str) -> Result<CertificateAuthority, Error> {
        let ca = CertificateAuthority::create(federation)?;
        fs::create_dir_all(&self.root).map_err(|source| Error::Write {
            path: self.root.clone(),
            source,
        })?;
        self.write_pair("ca", ca.material())?;
        Ok(ca)
    }

    /// Loads the CA written by [`PkiDir::init`].
    pub fn load_ca(&self) -> Result<CertificateAuthority, Error> {
        let files = self.tls_files("ca");
        let material = TlsMaterial::load(&TlsFiles {
            ca: files.cert.clone(),
            cert: files.cert,
            key: self.root.join("ca.key"),
        })?;
        CertificateAuthority::from_pem(material.identity)
    }

    /// Issues a certificate with `ca` and writes it as `<name>.pem`/`<name>.key`.
    pub fn issue(
        &self,
        ca: &CertificateAuthority,
        request: &CertificateRequest,
    ) -> Result<TlsFiles, Error> {
        let issued = ca.issue(request)?;
        self.write_pair(&request.name, &issued)?;
        Ok(self.tls_files(&request.name))
    }

    /// Renews `<name>.pem` with `ca` (see [`CertificateAuthority::renew`])
    /// and replaces the files atomically, so a running service watching
    /// them never reads half a file.
    pub fn renew(
        &self,
        ca: &CertificateAuthority,
        name: &str,
        valid_for: Duration,
        new_key: bool,
    ) -> Result<TlsFiles, Error> {
        let files = self.tls_files(name);
        let current = TlsMaterial::load(&files)?.identity;
        let renewed = ca.renew(&current, valid_for, new_key)?;
        if new_key {
            replace_file(&files.key, &renewed.key_pem, 0o600)?;
        }
        replace_file(&files.cert, &renewed.cert_pem, 0o644)?;
        Ok(files)
    }

    fn write_pair(&self, name: &str, material: &CertifiedKey) -> Result<(), Error> {
        let cert = self.root.join(format!("{name}.pem"));
        let key = self.root.join(format!("{name}.key"));
        for path in [&cert, &key] {
            if path.exists() {
                return Err(Error::Exists { path: path.clone() });
            }
        }
        write_file(&cert, &material.cert_pem, 0o644)?;
        write_file(&key, &material.key_pem, 0o600)
    }
}

/// Writes `contents` beside `path` and renames it over `path`.
pub fn replace_file(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    write_file(&temporary, contents, mode)?;
    fs::rename(&temporary, path).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })?;
    file.write_all(contents.as_bytes())
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let (_, doc) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        doc.contents
    }

    #[test]
    fn members_are_verified_against_their_own_ca_only() {
        let ca = CertificateAuthority::create("G-Health").unwrap();
        let issued = ca
            .issue(&CertificateRequest::new(
                "chosun",
                Role::Node,
                "Chosun University Hospital",
            ))
            .unwrap();
        let who = verify_member(ca.cert_pem(), &issued.cert_pem).unwrap();
        assert_eq!(who.name, "chosun");
        let other = CertificateAuthority::create("Elsewhere").unwrap();
        assert!(matches!(
            verify_member(other.cert_pem(), &issued.cert_pem),
            Err(Error::Untrusted(_))
        ));
    }

    #[test]
    fn issued_certificate_carries_name_role_and_organisation() {
        let ca = CertificateAuthority::create("G-Health").unwrap();
        let issued = ca
            .issue(&CertificateRequest::new(
                "chosun",
                Role::Node,
                "Chosun University Hospital",
            ))
            .unwrap();
        let identity = PeerIdentity::from_chain(&[der(&issued.cert_pem)]).unwrap();
        assert_eq!(
            identity,
            PeerIdentity {
                name: "chosun".into(),
                role: Role::Node,
                organisation: "Chosun University Hospital".into(),
                source: None,
            }
        );
    }

    #[test]
    fn ca_round_trips_through_a_directory_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("G-Health").unwrap();
        let ca = pki.load_ca().unwrap();
        let req = CertificateRequest::new("alice", Role::Committee, "G-Health");
        let files = pki.issue(&ca, &req).unwrap();
        assert!(files.cert.exists() && files.key.exists());
        assert!(matches!(pki.issue(&ca, &req), Err(Error::Exists { .. })));
        assert!(matches!(pki.init("again"), Err(Error::Exists { .. })));
    }

    #[test]
    fn rejects_names_that_are_not_simple_ids() {
        let ca = CertificateAuthority::create("G-Health").unwrap();
        for bad in ["", "Chosun", "a b", "-x", "../etc"] {
            let req = CertificateRequest::new(bad, Role::Node, "X");
            assert!(
                matches!(ca.issue(&req), Err(Error::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_roles_are_named_in_the_error() {
        let err = "admin".parse::<Role>().unwrap_err();
        assert!(err.to_string().contains("unknown role `admin`"));
    }
}
