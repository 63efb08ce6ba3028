//! `ghx policy`: write a hospital's default policies, or check them
//! against a manifest or query as its node would.

use crate::args::PolicyCommand;
use anyhow::{Context, Result};

pub(super) fn policy(command: PolicyCommand) -> Result<()> {
    use ghx_node::policy::{self, Overwrite, PolicyDir};
    match command {
        PolicyCommand::Init {
            hospital,
            out,
            force,
        } => {
            let overwrite = if force {
                Overwrite::Replace
            } else {
                Overwrite::Keep
            };
            policy::write_defaults(&hospital, &out, overwrite)?;
            println!(
                "wrote the default policies of {hospital} to {}; review them with your privacy officer",
                out.display()
            );
            Ok(())
        }
        PolicyCommand::Check {
            dir,
            query,
            org,
            requester,
            purpose,
            action,
            node,
            min_cell_size,
            json,
        } => {
            let loaded = PolicyDir::load(&dir)?;
            let Some(query) = query else {
                println!(
                    "{}: {} access rules valid against the ghx schema; consent default {}; {} rare-disease codes",
                    dir.display(),
                    loaded.rule_count,
                    loaded.consent.default,
                    loaded.consent.sensitive.rare_disease_prefixes.len()
                );
                return Ok(());
            };
            ghx_study::purpose::check(&purpose)?;
            let node = match node {
                Some(node) => node,
                None => dir
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .context("name the node with --node")?,
            };
            let text = std::fs::read(&query)
                .with_context(|| format!("cannot read {}", query.display()))?;
            // A bare query is checked as the only query of a manifest with
            // the given purpose and cell size.
            let manifest_json = match ghx_study::manifest::StudyManifest::parse(&text) {
                Ok(_) => text.clone(),
                Err(
                    ghx_study::manifest::Error::Version(_) | ghx_study::manifest::Error::Syntax(_),
                ) if ghx_study::query::QuerySpec::parse(&text).is_ok() => {
                    let query_text = String::from_utf8_lossy(&text).into_owned();
                    ghx::local_federation::manifest_for(
                        "policy check",
                        &purpose,
                        &[("query", &query_text)],
                    )
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{} is neither a valid manifest nor a valid query",
                            query.display()
                        )
                    });
                }
            };
            let mut manifest = ghx_study::manifest::StudyManifest::parse(&manifest_json)?;
            manifest.requester.organisation = org.clone();
            manifest.requester.user = requester.clone();
            let action: Option<ghx_node::policy::Action> = action
                .map(|a| a.parse().map_err(anyhow::Error::msg))
                .transpose()?;
            let facts = ghx_node::gate::NodeFacts {
                node_id: &node,
                min_cell_size,
                now: time::OffsetDateTime::now_utc().unix_timestamp(),
            };
            let decisions: Vec<_> =
                ghx_node::gate::check_manifest(&loaded, &manifest, facts, action)?
                    .into_iter()
                    .map(|c| (c.name, c.request, c.decision))
                    .collect();
            let purpose = &manifest.purpose;
            if json {
                let out: Vec<_> = decisions
                    .iter()
                    .map(|(name, request, decision)| {
                        serde_json::json!({"query": name, "request": request, "decision": decision})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for (name, request, decision) in &decisions {
                    println!(
                        "{} {} `{name}` by {org} for {purpose} at {node}: {}",
                        if decision.allowed { "ALLOW" } else { "DENY" },
                        request.action.name(),
                        decision.summary()
                    );
                    for error in &decision.errors {
                        println!("  rule error (skipped, which can only deny): {error}");
                    }
                }
            }
            let allowed = decisions.iter().all(|(_, _, d)| d.allowed);
            if !allowed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
