//! What the command-line tests share: running the real `ghx` binary as a
//! federation member.

use std::process::Command;

use ghx::local_federation::LocalFederation;

/// Runs `ghx <args>` as `member`; returns (success, stdout, stderr).
pub(crate) async fn ghx(
    federation: &LocalFederation,
    member: &str,
    args: &[&str],
) -> (bool, String, String) {
    let files = federation.pki.tls_files(member);
    let url = format!("https://localhost:{}", federation.coordinator_addr.port());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ghx"))
            .args(&args)
            .env("GHX_COORDINATOR", url)
            .env("GHX_CA", &files.ca)
            .env("GHX_CERT", &files.cert)
            .env("GHX_KEY", &files.key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
