//! Layered configuration for the node and the coordinator: the type's
//! defaults, then a TOML file, then `GHX_<SERVICE>__*` environment
//! variables, then `--set key=value` flags, each layer overriding the one
//! before; the result is deserialised into the service's typed config once,
//! which then validates itself.
//!
//! Key decision: layers merge as TOML tables before anything is typed, so
//! every layer speaks the file's own key names (`audit.retention_days` is
//! `GHX_NODE__AUDIT__RETENTION_DAYS` and `--set audit.retention_days=1000`)
//! and the typed config keeps rejecting unknown keys whichever layer they
//! came from. A value is read as a TOML literal when it is one (`7`,
//! `true`, `["a"]`) and as a string otherwise.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Errors reading or merging configuration layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {origin}: {problem}")]
    Override { origin: String, problem: String },
    #[error("invalid configuration ({layers}): {message}")]
    Typed { layers: String, message: String },
}

/// Where configuration comes from, weakest first.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Variables whose name starts with this (e.g. `GHX_NODE__`) set keys;
    /// `__` separates table levels.
    pub env_prefix: String,
    /// The environment to read (the process's, or a test's).
    pub env: Vec<(String, String)>,
    /// `key.sub=value` overrides, strongest.
    pub overrides: Vec<String>,
}

impl Sources {
    /// The file, this process's environment under `env_prefix`, and flags.
    pub fn from_process(file: Option<&Path>, env_prefix: &str, overrides: &[String]) -> Self {
        Sources {
            file: file.map(Path::to_owned),
            env_prefix: env_prefix.to_owned(),
            env: std::env::vars().collect(),
            overrides: overrides.to_vec(),
        }
    }

    /// The directory relative paths are resolved against: the file's, or
    /// the working directory's when there is no file.
    pub fn base_dir(&self) -> PathBuf {
        self.file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The merged table of every layer.
    pub fn merged(&self) -> Result<Table, Error> {
        let mut table = match &self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                text.parse::<Table>().map_err(|e| Error::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => Table::new(),
        };
        let mut env: Vec<&(String, String)> = self.service_env().collect();
        env.sort();
        for (name, value) in env {
            let key = name[self.env_prefix.len()..].to_ascii_lowercase();
            let path: Vec<&str> = key.split("__").collect();
            set(&mut table, &path, literal(value)).map_err(|problem| Error::Override {
                origin: format!("environment variable {name}"),
                problem,
            })?;
        }
        for text in &self.overrides {
            let origin = || format!("--set {text}");
            let (key, value) = text.split_once('=').ok_or_else(|| Error::Override {
                origin: origin(),
                problem: "expected key=value, e.g. audit.retention_days=1000".to_owned(),
            })?;
            let path: Vec<&str> = key.trim().split('.').collect();
            set(&mut table, &path, literal(value.trim())).map_err(|problem| Error::Override {
                origin: origin(),
                problem,
            })?;
        }
        Ok(table)
    }

    /// Every layer merged and deserialised into `T`.
    pub fn load<T: DeserializeOwned>(&self) -> Result<T, Error> {
        // The file alone is read as written, so that an error points at
        // its line in the file.
        if let Some(path) = &self.file
            && self.overrides.is_empty()
            && self.service_env().next().is_none()
        {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            return toml::from_str(&text).map_err(|e: toml::de::Error| Error::Parse {
                path: path.clone(),
                message: e.to_string(),
            });
        }
        // Layers merged go through text again, so that a bad value's error
        // shows its key and the line it is on in the merged text.
        let text = toml::to_string(&self.merged()?).map_err(|e| Error::Typed {
            layers: self.describe(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e: toml::de::Error| Error::Typed {
            layers: self.describe(),
            message: e.to_string(),
        })
    }

    /// The environment variables that set this service's keys.
    fn service_env(&self) -> impl Iterator<Item = &(String, String)> {
        self.env
            .iter()
            .filter(|(k, _)| !self.env_prefix.is_empty() && k.starts_with(&self.env_prefix))
    }

    /// The layers in words, for error messages.
    fn describe(&self) -> String {
        let mut layers = Vec::new();
        if let Some(f) = &self.file {
            layers.push(f.display().to_string());
        }
        if self.service_env().next().is_some() {
            layers.push(format!("{}* environment", self.env_prefix));
        }
        if !self.overrides.is_empty() {
            layers.push("--set flags".to_owned());
        }
        if layers.is_empty() {
            "defaults only".to_owned()
        } else {
            layers.join(" + ")
        }
    }
}

/// `text` as a TOML literal when it parses as one, else as a string.
fn literal(text: &str) -> Value {
    format!("v = {text}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

fn set(table: &mut Table, path: &[&str], value: Value) -> Result<(), String> {
    let (last, parents) = path
        .split_last()
        .filter(|(last, _)| !last.is_empty())
        .ok_or_else(|| "empty key".to_owned())?;
    let mut at = table;
    for (i, part) in parents.iter().enumerate() {
        if part.is_empty() {
            return Err("empty key part".to_owned());
        }
        let entry = at
            .entry((*part).to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        at = match entry {
            Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "`{}` is a value, not a table",
                    parents[..=i].join(".")
                ));
            }
        };
    }
    at.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        name: String,
        #[serde(default)]
        size: u32,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        days: u32,
        #[serde(default)]
        tags: Vec<String>,
    }

    fn sources(
        file: &str,
        env: &[(&str, &str)],
        overrides: &[&str],
    ) -> (Sources, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        (
            Sources {
                file: Some(path),
                env_prefix: "GHX_TEST__".into(),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                overrides: overrides.iter().map(|s| (*s).to_owned()).collect(),
            },
            dir,
        )
    }

    #[test]
    fn later_layers_win_key_by_key() {
        let (s, _d) = sources(
            "name = \"file\"\nsize = 1\n[inner]\ndays = 3\n",
            &[
                ("GHX_TEST__SIZE", "2"),
                ("GHX_TEST__INNER__TAGS", "[\"a\", \"b\"]"),
                ("GHX_OTHER", "ignored"),
            ],
            &["inner.days=9"],
        );
        let d: Demo = s.load().unwrap();
        assert_eq!(
            d,
            Demo {
                name: "file".into(),
                size: 2,
                inner: Inner {
                    days: 9,
                    tags: vec!["a".into(), "b".into()]
                }
            }
        );
    }

    #[test]
    fn bad_layers_are_named() {
        let (s, _d) = sources("name = \"x\"\n", &[("GHX_TEST__COLOUR", "red")], &[]);
        let e = s.load::<Demo>().unwrap_err().to_string();
        assert!(
            e.contains("unknown field `colour`") && e.contains("GHX_TEST__* environment"),
            "{e}"
        );
        let (s, _d) = sources("name = \"x\"\n", &[], &["size"]);
        assert!(
            s.load::<Demo>()
                .unwrap_err()
                .to_string()
                .contains("--set size: expected key=value")
        );
        let (s, _d) = sources("name = \"x\"\n", &[], &["name.first=a"]);
        assert!(
            s.load::<Demo>()
                .unwrap_err()
                .to_string()
                .contains("`name` is a value, not a table")
        );
        let (s, _d) = sources("name = \"x\"\n", &[], &["size=big"]);
        let e = s.load::<Demo>().unwrap_err().to_string();
        assert!(
            e.contains("invalid type: string \"big\", expected u32"),
            "{e}"
        );
    }
}
