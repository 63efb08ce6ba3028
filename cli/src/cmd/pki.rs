//! `ghx pki`: the federation CA, certificates and the signing key.

use std::path::Path;

use crate::args::PkiCommand;
use anyhow::{Context, Result, bail};
use ghx_pki::{CertificateRequest, PkiDir, Role};

pub(super) fn pki(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir, federation } => {
            PkiDir::new(&dir).init(&federation)?;
            println!(
                "created the {federation} federation CA in {}",
                dir.display()
            );
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            org,
            hosts,
            days,
            valid_for,
        } => {
            let pki = PkiDir::new(&dir);
            let ca = pki.load_ca()?;
            let role: Role = role.parse()?;
            let mut request = CertificateRequest::new(&name, role, &org);
            if !hosts.is_empty() {
                request.hosts = hosts;
            }
            request.valid_for = valid_for.unwrap_or(time::Duration::days(days));
            let files = pki.issue(&ca, &request)?;
            println!(
                "issued {} ({role}) -> {} and {}",
                name,
                files.cert.display(),
                files.key.display()
            );
        }
        PkiCommand::Renew {
            dir,
            name,
            valid_for,
            new_key,
        } => {
            let pki = PkiDir::new(&dir);
            let ca = pki.load_ca()?;
            let files = pki.renew(&ca, &name, valid_for, new_key)?;
            let cert = std::fs::read_to_string(&files.cert)?;
            let expires = ghx_pki::readiness::expires_at(&cert)?;
            println!(
                "renewed {name} until {expires} ({}) -> {}",
                if new_key { "new key" } else { "same key" },
                files.cert.display()
            );
        }
        PkiCommand::Pin { cert } => {
            let pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", ghx_pki::signed::key_pin(&pem)?);
        }
        PkiCommand::SigningKey { dir, name } => {
            std::fs::create_dir_all(&dir)?;
            let private_path = dir.join(format!("{name}.pem"));
            let public_path = dir.join(format!("{name}.pub.pem"));
            if private_path.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a signing key",
                    private_path.display()
                );
            }
            let (private, public) = ghx_study::capability::generate_signing_key()?;
            write_private(&private_path, &private)?;
            std::fs::write(&public_path, public)?;
            println!(
                "wrote {} (keep it on the coordinator) and {} (give it to every node)",
                private_path.display(),
                public_path.display()
            );
        }
    }
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
