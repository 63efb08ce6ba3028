//! SQL on FHIR v2 ViewDefinitions evaluated over FHIR JSON resources: the
//! standard way to define flat variables on FHIR data, so a requester can
//! bring a view instead of learning the ghx query language.
//!
//! [`View::parse`] checks a ViewDefinition (resource, FHIRPath syntax,
//! `forEach` types, `unionAll` branches with the same columns) and
//! [`View::rows`] evaluates it on one resource: `select` with nested
//! `select`, `forEach`, `forEachOrNull`, `repeat`, `unionAll`, `where`,
//! `constant` and `%rowIndex`.
//!
//! Key decision: our own evaluator of the FHIRPath subset views use
//! ([`fhirpath`]) instead of a crate. The Rust SQL-on-FHIR crates either need
//! a newer compiler than this project's (octofhir-sof 0.3 via
//! octofhir-fhirpath 0.5 needs Rust 1.98, with ~280 dependencies including a
//! second `base64`) or carry generated models of four FHIR versions
//! (helios-sof). The official test suite measures this one (see
//! `tests/conformance.rs`).

#![forbid(unsafe_code)]

pub mod fhirpath;

use fhirpath::{Env, Expr, Item};
use serde_json::{Map, Value};

/// A view that is not valid, or failed on a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("ViewDefinition: {0}")]
    Invalid(String),
    #[error(transparent)]
    Path(#[from] fhirpath::Error),
    #[error("column `{column}` holds {count} values but is not a collection")]
    NotACollection { column: String, count: usize },
    #[error("where path `{0}` does not evaluate to a boolean")]
    WhereNotBoolean(String),
}

fn invalid(problem: impl Into<String>) -> Error {
    Error::Invalid(problem.into())
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    path: Expr,
    collection: bool,
}

#[derive(Debug, Clone, Default)]
struct Select {
    columns: Vec<Column>,
    selects: Vec<Select>,
    for_each: Option<(Expr, bool)>,
    repeat: Vec<Expr>,
    union_all: Vec<Select>,
}

/// A parsed, checked ViewDefinition.
#[derive(Debug, Clone)]
pub struct View {
    resource: String,
    constants: Vec<(String, Item)>,
    selects: Vec<Select>,
    filters: Vec<(String, Expr)>,
    columns: Vec<String>,
}

/// One output row: column name to value, in column order.
pub type Row = Map<String, Value>;

fn path(value: &Value, what: &str) -> Result<Expr, Error> {
    let text = value
        .as_str()
        .ok_or_else(|| invalid(format!("{what} must be a FHIRPath string")))?;
    Ok(fhirpath::parse(text)?)
}

fn parse_select(value: &Value) -> Result<Select, Error> {
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("select must be an object"))?;
    let mut select = Select::default();
    for c in obj
        .get("column")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("every column needs a name"))?;
        let ok_name = name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            && name.starts_with(|ch: char| ch.is_ascii_alphabetic());
        if !ok_name {
            return Err(invalid(format!(
                "column name `{name}` is not a database-friendly name"
            )));
        }
        select.columns.push(Column {
            name: name.to_owned(),
            path: path(c.get("path").unwrap_or(&Value::Null), "column.path")?,
            collection: c.get("collection").and_then(Value::as_bool) == Some(true),
        });
    }
    for s in obj
        .get("select")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        select.selects.push(parse_select(s)?);
    }
    for u in obj
        .get("unionAll")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        select.union_all.push(parse_select(u)?);
    }
    if let Some(r) = obj.get("repeat") {
        let paths = r
            .as_array()
            .ok_or_else(|| invalid("repeat must be a list of paths"))?;
        for p in paths {
            select.repeat.push(path(p, "repeat")?);
        }
    }
    match (obj.get("forEach"), obj.get("forEachOrNull")) {
        (Some(_), Some(_)) => return Err(invalid("forEach and forEachOrNull are exclusive")),
        (Some(p), None) => select.for_each = Some((path(p, "forEach")?, false)),
        (None, Some(p)) => select.for_each = Some((path(p, "forEachOrNull")?, true)),
        (None, None) => {}
    }
    if select.union_all.len() > 1 {
        let first = columns_of(&select.union_all[0]);
        if select.union_all.iter().any(|u| columns_of(u) != first) {
            return Err(invalid("every unionAll branch must have the same columns"));
        }
    }
    Ok(select)
}

/// The column names a select produces, in order.
fn columns_of(select: &Select) -> Vec<String> {
    let mut names: Vec<String> = select.columns.iter().map(|c| c.name.clone()).collect();
    for s in &select.selects {
        names.extend(columns_of(s));
    }
    if let Some(first) = select.union_all.first() {
        names.extend(columns_of(first));
    }
    names
}

/// A constant's value: the one `value[x]` element, typed by its suffix.
fn constant(value: &Value) -> Result<(String, Item), Error> {
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("constant must be an object"))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("constant needs a name"))?;
    let (key, v) = obj
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .ok_or_else(|| invalid(format!("constant `{name}` has no value")))?;
    let ty = key["value".len()..].to_owned();
    Ok((
        name.to_owned(),
        Item {
            value: v.clone(),
            ty: Some(ty),
        },
    ))
}

impl View {
    /// Parses and checks a ViewDefinition.
    pub fn parse(json: &Value) -> Result<View, Error> {
        let obj = json
            .as_object()
            .ok_or_else(|| invalid("must be a JSON object"))?;
        let resource = obj
            .get("resource")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("needs the resource type it reads (`resource`)"))?
            .to_owned();
        let constants = obj
            .get("constant")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(constant)
            .collect::<Result<_, _>>()?;
        let selects: Vec<Select> = obj
            .get("select")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("needs at least one select"))?
            .iter()
            .map(parse_select)
            .collect::<Result<_, _>>()?;
        let filters = obj
            .get("where")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|w| {
                let p = w.get("path").unwrap_or(&Value::Null);
                Ok((p.as_str().unwrap_or("").to_owned(), path(p, "where.path")?))
            })
            .collect::<Result<_, Error>>()?;
        let mut columns = Vec::new();
        for s in &selects {
            for name in columns_of(s) {
                if columns.contains(&name) {
                    return Err(invalid(format!("column `{name}` is defined twice")));
                }
                columns.push(name);
            }
        }
        Ok(View {
            resource,
            constants,
            selects,
            filters,
            columns,
        })
    }

    /// The resource type the view reads.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The view's column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The rows the view makes of one resource (none for another type).
    pub fn rows(&self, resource: &Value) -> Result<Vec<Row>, Error> {
        if resource.get("resourceType").and_then(Value::as_str) != Some(&self.resource) {
            return Ok(Vec::new());
        }
        let env = Env {
            constants: &self.constants,
            row_index: 0,
        };
        let focus = [Item::new(resource.clone())];
        for (text, filter) in &self.filters {
            match fhirpath::eval(filter, &focus, &env)?.as_slice() {
                [] => return Ok(Vec::new()),
                [
                    Item {
                        value: Value::Bool(b),
                        ..
                    },
                ] => {
                    if !b {
                        return Ok(Vec::new());
                    }
                }
                _ => return Err(Error::WhereNotBoolean(text.clone())),
            }
        }
        let mut rows = vec![Row::new()];
        for select in &self.selects {
            let produced = self.select_rows(select, &focus[0], 0)?;
            rows = product(&rows, &produced);
        }
        Ok(rows)
    }

    fn select_rows(
        &self,
        select: &Select,
        focus: &Item,
        row_index: i64,
    ) -> Result<Vec<Row>, Error> {
        let env = |row_index| Env {
            constants: &self.constants,
            row_index,
        };
        // The focus items this select iterates, with their row indices.
        let foci: Vec<(Option<Item>, i64)> = if let Some((each, or_null)) = &select.for_each {
            let items = fhirpath::eval(each, std::slice::from_ref(focus), &env(row_index))?;
            if items.is_empty() && *or_null {
                vec![(None, 0)]
            } else {
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| (Some(item), i as i64))
                    .collect()
            }
        } else if !select.repeat.is_empty() {
            let mut found = Vec::new();
            repeat(&select.repeat, focus, &env(row_index), &mut found)?;
            found
                .into_iter()
                .enumerate()
                .map(|(i, item)| (Some(item), i as i64))
                .collect()
        } else {
            vec![(Some(focus.clone()), row_index)]
        };
        let mut out = Vec::new();
        for (item, index) in foci {
            let mut row = Row::new();
            for column in &select.columns {
                // forEachOrNull without items: columns see an empty focus.
                let values = fhirpath::eval(&column.path, item.as_slice(), &env(index))?;
                let value = if column.collection {
                    Value::Array(values.into_iter().map(|i| i.value).collect())
                } else {
                    match values.len() {
                        0 => Value::Null,
                        1 => values
                            .into_iter()
                            .next()
                            .map(|i| i.value)
                            .unwrap_or_default(),
                        count => {
                            return Err(Error::NotACollection {
                                column: column.name.clone(),
                                count,
                            });
                        }
                    }
                };
                row.insert(column.name.clone(), value);
            }
            let mut rows = vec![row];
            for nested in &select.selects {
                let produced = match &item {
                    Some(item) => self.select_rows(nested, item, index)?,
                    None => vec![null_row(nested)],
                };
                rows = product(&rows, &produced);
            }
            if let Some(first) = select.union_all.first() {
                let mut union = Vec::new();
                match &item {
                    Some(item) => {
                        for branch in &select.union_all {
                            union.extend(self.select_rows(branch, item, index)?);
                        }
                    }
                    // One row of nulls, not one per branch.
                    None => union.push(null_row(first)),
                }
                rows = product(&rows, &union);
            }
            out.extend(rows);
        }
        Ok(out)
    }
}

/// Every item reachable by following the paths repeatedly, depth first.
fn repeat(paths: &[Expr], focus: &Item, env: &Env<'_>, out: &mut Vec<Item>) -> Result<(), Error> {
    for p in paths {
        for child in fhirpath::eval(p, std::slice::from_ref(focus), env)? {
            out.push(child.clone());
            repeat(paths, &child, env, out)?;
        }
    }
    Ok(())
}

fn null_row(select: &Select) -> Row {
    columns_of(select)
        .into_iter()
        .map(|c| (c, Value::Null))
        .collect()
}

/// Every combination of a row of `a` with a row of `b`.
fn product(a: &[Row], b: &[Row]) -> Vec<Row> {
    let mut out = Vec::with_capacity(a.len() * b.len());
    for x in a {
        for y in b {
            let mut row = x.clone();
            row.extend(y.iter().map(|(k, v)| (k.clone(), v.clone())));
            out.push(row);
        }
    }
    out
}
