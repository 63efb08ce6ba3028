//! The services' own mTLS: peers are verified against the federation CA in
//! both directions, and a certificate replaced on disk is presented on the
//! next connection, while an unusable replacement is refused and the old
//! certificate kept.

use futures::StreamExt;
use ghx_pki::transport::{Conn, Transport};
use ghx_pki::{CertificateAuthority, CertificateRequest, PeerIdentity, PkiDir, Role};
use tonic::transport::server::Connected;

fn federation(dir: &std::path::Path) -> (PkiDir, CertificateAuthority) {
    let pki = PkiDir::new(dir);
    let ca = pki.init("G-Health").unwrap();
    pki.issue(
        &ca,
        &CertificateRequest::new("chosun", Role::Node, "Chosun University Hospital"),
    )
    .unwrap();
    pki.issue(
        &ca,
        &CertificateRequest::new("coordinator", Role::Coordinator, "G-Health"),
    )
    .unwrap();
    (pki, ca)
}

fn leaf_of(conn: &Conn) -> Vec<u8> {
    conn.connect_info().certs[0].to_vec()
}

fn file_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

#[tokio::test]
async fn renewed_certificates_are_presented_on_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ca) = federation(dir.path());
    let server = Transport::load(&pki.tls_files("chosun")).unwrap();
    let client = Transport::load(&pki.tls_files("coordinator")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = Box::pin(server.incoming(listener));

    let dialled = client.dial(&addr, "chosun").await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    let first_client = leaf_of(&accepted);
    let first_server = dialled.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(first_client, file_der(&pki.tls_files("coordinator").cert));
    let who = PeerIdentity::from_chain(&accepted.connect_info().certs).unwrap();
    assert_eq!(
        (who.name.as_str(), who.role),
        ("coordinator", Role::Coordinator)
    );

    // Both sides' certificates are renewed on disk (the server's with a
    // new key) and picked up without restarting anything.
    pki.renew(&ca, "coordinator", time::Duration::hours(6), false)
        .unwrap();
    pki.renew(&ca, "chosun", time::Duration::hours(6), true)
        .unwrap();
    assert!(client.identity().reload().unwrap());
    assert!(server.identity().reload().unwrap());
    assert!(
        !server.identity().reload().unwrap(),
        "nothing new the second time"
    );

    let dialled = client.dial(&addr, "chosun").await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    let second_client = leaf_of(&accepted);
    let second_server = dialled.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_ne!(first_client, second_client);
    assert_ne!(first_server, second_server);
    assert_eq!(second_client, file_der(&pki.tls_files("coordinator").cert));
    assert_eq!(second_server, file_der(&pki.tls_files("chosun").cert));
    let renewed = ghx_pki::readiness::expires_at(
        &std::fs::read_to_string(pki.tls_files("chosun").cert).unwrap(),
    )
    .unwrap();
    let left = renewed - time::OffsetDateTime::now_utc();
    assert!(left <= time::Duration::hours(6) && left > time::Duration::hours(5));
}

#[tokio::test]
async fn a_replacement_from_another_ca_is_refused_and_the_old_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, _) = federation(dir.path());
    let server = Transport::load(&pki.tls_files("chosun")).unwrap();
    let before = server.identity().current_pem().cert_pem;

    let rogue = CertificateAuthority::create("Rogue").unwrap();
    let forged = rogue
        .issue(&CertificateRequest::new(
            "chosun",
            Role::Node,
            "Chosun University Hospital",
        ))
        .unwrap();
    let files = pki.tls_files("chosun");
    ghx_pki::replace_file(&files.key, &forged.key_pem, 0o600).unwrap();
    ghx_pki::replace_file(&files.cert, &forged.cert_pem, 0o644).unwrap();
    let error = server.identity().reload().unwrap_err().to_string();
    assert!(error.contains("chosun.pem"), "{error}");
    assert!(error.contains("federation CA"), "{error}");
    assert_eq!(server.identity().current_pem().cert_pem, before);

    // A key that is not the certificate's is refused too.
    let other = CertificateAuthority::create("Other").unwrap();
    let stray = other
        .issue(&CertificateRequest::new("x", Role::Node, "X"))
        .unwrap();
    std::fs::write(&files.cert, &before).unwrap();
    ghx_pki::replace_file(&files.key, &stray.key_pem, 0o600).unwrap();
    let error = server.identity().reload().unwrap_err().to_string();
    assert!(error.contains("does not match"), "{error}");
    assert_eq!(server.identity().current_pem().cert_pem, before);
}

#[tokio::test]
async fn a_peer_from_another_ca_gets_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, _) = federation(dir.path());
    let server = Transport::load(&pki.tls_files("chosun")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = Box::pin(server.incoming(listener));

    let elsewhere = tempfile::tempdir().unwrap();
    let (rogue_pki, _) = federation(elsewhere.path());
    let rogue = Transport::load(&rogue_pki.tls_files("coordinator")).unwrap();
    // The rogue does not trust chosun's certificate, and chosun would not
    // trust the rogue's.
    assert!(rogue.dial(&addr, "chosun").await.is_err());
    let none = tokio::time::timeout(std::time::Duration::from_millis(300), incoming.next()).await;
    assert!(none.is_err(), "no connection was handed to the server");

    // The right federation, the wrong name: refused by the client.
    let client = Transport::load(&pki.tls_files("coordinator")).unwrap();
    let error = client.dial(&addr, "chonnam").await.unwrap_err().to_string();
    assert!(
        error.contains("chonnam") || error.contains("NotValidForName"),
        "{error}"
    );
}
