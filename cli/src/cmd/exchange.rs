//! `ghx exchange`: the identity service's keys and signed requests, and
//! the recipient service's key and fetch.

use anyhow::{Context, Result, bail};
use ghx_exchange::keys::RecipientKey;
use ghx_exchange::request::{Claims, IdentitySigner, Kind, Resident};

use super::connect;
use crate::args::{AuthoriseArgs, ExchangeCommand};

pub(super) async fn exchange(command: ExchangeCommand) -> Result<()> {
    match command {
        ExchangeCommand::IdentityKey { out_dir } => {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let (private, public) = ghx_exchange::request::generate_identity_key()?;
            write(&out_dir.join("identity.pem"), &private)?;
            write(&out_dir.join("identity.pub.pem"), &public)?;
            println!(
                "wrote {0}/identity.pem (keep it private) and {0}/identity.pub.pem (for the hospitals' [exchange] identity_keys)",
                out_dir.display()
            );
            Ok(())
        }
        ExchangeCommand::RecipientKey { out } => {
            let key = RecipientKey::generate();
            write(&out, &key.to_file())?;
            println!(
                "wrote {} (keep it private); public key, to register with the platform: {}",
                out.display(),
                key.public_hex()
            );
            Ok(())
        }
        ExchangeCommand::Authorise(args) => {
            println!("{}", authorise(&args)?);
            Ok(())
        }
        ExchangeCommand::Fetch {
            client,
            recipient_key,
            request,
            out,
            hospital_pin,
        } => {
            let mut pins = std::collections::BTreeMap::new();
            for p in &hospital_pin {
                let (hospital, pin) = p
                    .split_once('=')
                    .with_context(|| format!("--hospital-pin `{p}`: expected HOSPITAL=PIN"))?;
                pins.insert(hospital.to_owned(), pin.to_owned());
            }
            let token = match request.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading the request from {path}"))?
                    .trim()
                    .to_owned(),
                None => request,
            };
            let key = RecipientKey::from_file(&read(&recipient_key)?)?;
            let cert = read(&client.cert)?;
            let ca = read(&client.ca)?;
            let name = ghx_pki::verify_member(&ca, &cert)?.name;
            let recipient =
                ghx::exchange::Recipient::new(&name, key, &cert, &read(&client.key)?, &ca)?
                    .with_hospital_pins(pins);
            let mut coordinator = connect(&client).await?;
            let fetched = ghx::exchange::fetch(&mut coordinator, &recipient, &token).await?;
            write(&out, &serde_json::to_string_pretty(&fetched.bundle)?)?;
            for r in &fetched.received {
                println!(
                    "{:<12} {:<9} {} resources",
                    r.hospital,
                    format!("{:?}", r.outcome).to_lowercase(),
                    r.resources.len()
                );
            }
            for (hospital, why) in &fetched.failed {
                println!("{hospital:<12} failed    {why}");
            }
            println!(
                "merged: {} resources ({} reported by more than one hospital, kept once) -> {}",
                fetched.report.resources,
                fetched.report.duplicates,
                out.display()
            );
            Ok(())
        }
    }
}

/// The signed request `args` describe.
fn authorise(args: &AuthoriseArgs) -> Result<String> {
    let resident = match (&args.rrn, &args.link_token) {
        (Some(rrn), _) => {
            let path = args.link_key.as_ref().context("--rrn needs --link-key")?;
            let key = ghx_disclosure::linkage::LinkKey::parse(&read(path)?)?;
            let digits: String = rrn.chars().filter(char::is_ascii_digit).collect();
            Resident {
                link_token: Some(key.token(&digits)),
                ..Resident::default()
            }
        }
        (None, Some(token)) => Resident {
            link_token: Some(token.clone()),
            ..Resident::default()
        },
        (None, None) => {
            if args.patient.is_empty() {
                bail!(
                    "name the resident: --rrn with --link-key, --link-token, or --patient HOSPITAL=ID"
                );
            }
            let mut patients = std::collections::BTreeMap::new();
            for p in &args.patient {
                let (hospital, id) = p
                    .split_once('=')
                    .with_context(|| format!("--patient `{p}`: expected HOSPITAL=ID"))?;
                patients.insert(hospital.to_owned(), id.to_owned());
            }
            Resident {
                patients,
                ..Resident::default()
            }
        }
    };
    let mut claims = Claims::new(
        "g-health-identity",
        args.hospitals.clone(),
        resident,
        (&args.recipient, &args.recipient_key),
        &args.scope,
        if args.history {
            Kind::History
        } else {
            Kind::Records
        },
        args.valid_secs,
    );
    claims.purpose = args.purpose.clone();
    // Checked here as the hospitals will, so a bad request fails early.
    claims.check()?;
    let signer = IdentitySigner::from_pem(&args.kid, &read(&args.identity_key)?)?;
    Ok(signer.sign(&claims)?)
}

fn read(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
