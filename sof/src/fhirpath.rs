//! The FHIRPath subset SQL on FHIR v2 views use (the spec's "shareable"
//! profile and more): paths with choice types, indexers, `$this`, `%`
//! constants, literals, `= != < <= > >= and or xor implies + - * / & |`,
//! and the functions `where exists empty first last count not join ofType
//! extension getResourceKey getReferenceKey lowBoundary highBoundary`.
//!
//! Values are FHIR JSON; an item remembers the type suffix of a choice
//! element (`valueQuantity` is a `value` of type `Quantity`) so `ofType`
//! works without a structure definition.

use serde_json::{Number, Value};

/// A FHIRPath expression that failed to parse or evaluate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("FHIRPath `{expression}`: {problem}")]
    Parse { expression: String, problem: String },
    #[error("FHIRPath: {0}")]
    Eval(String),
}

/// One element of a collection: a JSON value and, for an element read
/// through a choice type, its type name (`Quantity`, `dateTime`).
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub value: Value,
    pub ty: Option<String>,
}

impl Item {
    pub fn new(value: Value) -> Item {
        Item { value, ty: None }
    }
}

/// What an expression may refer to besides its focus.
pub struct Env<'a> {
    pub constants: &'a [(String, Item)],
    pub row_index: i64,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Date(String),
    Const(String),
    Op(&'static str),
}

fn lex(src: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string".into()),
                        Some('\'') => break,
                        Some('\\') => {
                            let e = chars.get(i + 1).ok_or("bad escape")?;
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => *other,
                            });
                            i += 2;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
                out.push(Token::Str(s));
            }
            '`' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|c| *c == '`')
                    .ok_or("unterminated identifier")?;
                out.push(Token::Ident(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            '@' => {
                let start = i + 1;
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "-:.+TZ".contains(chars[i]))
                {
                    i += 1;
                }
                if i == start {
                    return Err("`@` must start a date or time literal".into());
                }
                out.push(Token::Date(chars[start..i].iter().collect()));
            }
            '%' | '$' => {
                let start = i + 1;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() {
                    return Err(format!("`{c}` must be followed by a name"));
                }
                out.push(if c == '$' {
                    Token::Ident(format!("${name}"))
                } else {
                    Token::Const(name)
                });
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit)
                {
                    i += 1;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                out.push(Token::Num(chars[start..i].iter().collect()));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
            _ => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = ["<=", ">=", "!=", "!~"]
                    .into_iter()
                    .find(|o| *o == two)
                    .or_else(|| {
                        [
                            "(", ")", "[", "]", "{", "}", ".", ",", "=", "<", ">", "+", "-", "*",
                            "/", "&", "|", "~",
                        ]
                        .into_iter()
                        .find(|o| o.starts_with(c))
                    })
                    .ok_or_else(|| format!("unexpected character `{c}`"))?;
                i += op.len();
                out.push(Token::Op(op));
            }
        }
    }
    Ok(out)
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Item),
    Empty,
    This,
    Const(String),
    /// A member of the focus (or of `target`).
    Member(Option<Box<Expr>>, String),
    /// A function applied to the focus (or to `target`).
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Binary(&'static str, Box<Expr>, Box<Expr>),
    Negate(Box<Expr>),
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

/// Binary operators by precedence, loosest first.
const LEVELS: [&[&str]; 8] = [
    &["implies"],
    &["or", "xor"],
    &["and"],
    &["in", "contains"],
    &["=", "!=", "~", "!~"],
    &["<", "<=", ">", ">="],
    &["|"],
    &["+", "-", "&"],
];
const MULTIPLICATIVE: &[&str] = &["*", "/", "div", "mod"];

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn peek_op(&self) -> Option<&'static str> {
        match self.peek()? {
            Token::Op(o) => Some(o),
            Token::Ident(w) => [
                "implies", "or", "xor", "and", "in", "contains", "div", "mod",
            ]
            .into_iter()
            .find(|k| k == w),
            _ => None,
        }
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        match self.peek() {
            Some(Token::Op(o)) if *o == op => {
                self.at += 1;
                Ok(())
            }
            other => Err(format!("expected `{op}`, found {other:?}")),
        }
    }

    fn binary(&mut self, level: usize) -> Result<Expr, String> {
        if level == LEVELS.len() {
            return self.multiplicative();
        }
        let mut left = self.binary(level + 1)?;
        while let Some(op) = self.peek_op().filter(|o| LEVELS[level].contains(o)) {
            self.at += 1;
            let right = self.binary(level + 1)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn multiplicative(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while let Some(op) = self.peek_op().filter(|o| MULTIPLICATIVE.contains(o)) {
            self.at += 1;
            let right = self.unary()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(Token::Op("-")) => {
                self.at += 1;
                Ok(Expr::Negate(Box::new(self.unary()?)))
            }
            Some(Token::Op("+")) => {
                self.at += 1;
                self.unary()
            }
            _ => self.postfix(),
        }
    }

    fn postfix(&mut self) -> Result<Expr, String> {
        let mut expr = self.term()?;
        loop {
            match self.peek() {
                Some(Token::Op(".")) => {
                    self.at += 1;
                    let Some(Token::Ident(name)) = self.peek().cloned() else {
                        return Err("expected a name after `.`".into());
                    };
                    self.at += 1;
                    expr = if self.peek() == Some(&Token::Op("(")) {
                        let args = self.arguments()?;
                        Expr::Call(Some(Box::new(expr)), name, args)
                    } else {
                        Expr::Member(Some(Box::new(expr)), name)
                    };
                }
                Some(Token::Op("[")) => {
                    self.at += 1;
                    let index = self.binary(0)?;
                    self.expect("]")?;
                    expr = Expr::Index(Box::new(expr), Box::new(index));
                }
                _ => return Ok(expr),
            }
        }
    }

    fn arguments(&mut self) -> Result<Vec<Expr>, String> {
        self.expect("(")?;
        let mut args = Vec::new();
        if self.peek() == Some(&Token::Op(")")) {
            self.at += 1;
            return Ok(args);
        }
        loop {
            args.push(self.binary(0)?);
            match self.peek() {
                Some(Token::Op(",")) => self.at += 1,
                Some(Token::Op(")")) => {
                    self.at += 1;
                    return Ok(args);
                }
                other => return Err(format!("expected `,` or `)`, found {other:?}")),
            }
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("unexpected end of expression")?;
        self.at += 1;
        Ok(match token {
            Token::Str(s) => Expr::Literal(Item::new(Value::String(s))),
            Token::Num(n) => Expr::Literal(Item::new(
                serde_json::from_str(&n).map_err(|e| format!("number `{n}`: {e}"))?,
            )),
            Token::Date(d) => Expr::Literal(Item::new(Value::String(d))),
            Token::Const(c) => Expr::Const(c),
            Token::Op("(") => {
                let e = self.binary(0)?;
                self.expect(")")?;
                e
            }
            Token::Op("{") => {
                self.expect("}")?;
                Expr::Empty
            }
            Token::Ident(w) if w == "$this" => Expr::This,
            Token::Ident(w) if w == "true" || w == "false" => {
                Expr::Literal(Item::new(Value::Bool(w == "true")))
            }
            Token::Ident(name) => {
                if self.peek() == Some(&Token::Op("(")) {
                    Expr::Call(None, name, self.arguments()?)
                } else {
                    Expr::Member(None, name)
                }
            }
            Token::Op(o) => return Err(format!("unexpected `{o}`")),
        })
    }
}

/// Parses an expression.
pub fn parse(expression: &str) -> Result<Expr, Error> {
    let fail = |problem: String| Error::Parse {
        expression: expression.to_owned(),
        problem,
    };
    let tokens = lex(expression).map_err(fail)?;
    let mut parser = Parser { tokens, at: 0 };
    let expr = parser.binary(0).map_err(fail)?;
    if parser.at != parser.tokens.len() {
        return Err(fail(format!(
            "unexpected {:?} after the expression",
            parser.tokens[parser.at]
        )));
    }
    Ok(expr)
}

fn eval_err(problem: impl Into<String>) -> Error {
    Error::Eval(problem.into())
}

/// The children named `name` of every item, flattening arrays; a choice
/// element is found by its typed key (`value` finds `valueQuantity`).
fn member(focus: &[Item], name: &str) -> Vec<Item> {
    let mut out = Vec::new();
    for item in focus {
        let Value::Object(map) = &item.value else {
            continue;
        };
        if name.starts_with(char::is_uppercase)
            && map.get("resourceType").and_then(Value::as_str) == Some(name)
        {
            out.push(item.clone());
            continue;
        }
        let mut push = |v: &Value, ty: Option<String>| match v {
            Value::Array(a) => out.extend(a.iter().map(|v| Item {
                value: v.clone(),
                ty: ty.clone(),
            })),
            Value::Null => {}
            v => out.push(Item {
                value: v.clone(),
                ty,
            }),
        };
        if let Some(v) = map.get(name) {
            push(v, None);
            continue;
        }
        for (key, v) in map {
            if let Some(suffix) = key.strip_prefix(name)
                && suffix.starts_with(char::is_uppercase)
            {
                push(v, Some(suffix.to_owned()));
            }
        }
    }
    out
}

fn single_bool(items: &[Item], what: &str) -> Result<Option<bool>, Error> {
    match items {
        [] => Ok(None),
        [
            Item {
                value: Value::Bool(b),
                ..
            },
        ] => Ok(Some(*b)),
        [_] => Ok(Some(true)),
        _ => Err(eval_err(format!("{what} needs a single boolean"))),
    }
}

fn boolean(b: Option<bool>) -> Vec<Item> {
    b.map(|b| vec![Item::new(Value::Bool(b))])
        .unwrap_or_default()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn equal(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => num(a)?.partial_cmp(&num(b)?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn number(x: f64, integer: bool) -> Value {
    if integer && x.fract() == 0.0 && x.abs() < 9e15 {
        Value::Number(Number::from(x as i64))
    } else {
        Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// Whether an item is of FHIR type `ty` (`Quantity`, `boolean`).
fn is_type(item: &Item, ty: &str) -> bool {
    let matches = |t: &str| t.eq_ignore_ascii_case(ty) && t[1..] == ty[1..];
    match &item.ty {
        Some(t) => matches(t),
        None => match (&item.value, ty) {
            (Value::Bool(_), "boolean") => true,
            (Value::String(_), "string") => true,
            (Value::Number(n), "integer") => n.is_i64(),
            (Value::Number(_), "decimal") => true,
            _ => false,
        },
    }
}

/// The number of decimal places a JSON number was written with.
fn decimals(n: &Number) -> usize {
    let s = n.to_string();
    s.split_once('.').map_or(0, |(_, f)| f.len())
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// lowBoundary / highBoundary of a decimal, date, dateTime or time.
fn boundary(item: &Item, high: bool) -> Option<Value> {
    match &item.value {
        Value::Number(n) => {
            // The interval the written precision allows: 1.0 is [0.95, 1.05].
            let places = decimals(n) as i32;
            let half = 0.5 * 10f64.powi(-places);
            let x = n.as_f64()? + if high { half } else { -half };
            let scale = 10f64.powi(places + 1);
            Number::from_f64((x * scale).round() / scale).map(Value::Number)
        }
        Value::String(s) => {
            let ty = item.ty.as_deref().unwrap_or("");
            if ty.eq_ignore_ascii_case("time") {
                let parts: Vec<&str> = s.split(':').collect();
                let (h, m) = (parts.first()?, parts.get(1).unwrap_or(&"00"));
                let sec = parts.get(2).map_or("00", |s| &s[..2.min(s.len())]);
                let ms = if high { "999" } else { "000" };
                return Some(Value::String(format!("{h}:{m}:{sec}.{ms}")));
            }
            let (date, _time) = s.split_once('T').unwrap_or((s, ""));
            let mut parts = date.split('-');
            let year: i32 = parts.next()?.parse().ok()?;
            let month: Option<u32> = parts.next().and_then(|m| m.parse().ok());
            let day: Option<u32> = parts.next().and_then(|d| d.parse().ok());
            let month_v = month.unwrap_or(if high { 12 } else { 1 });
            let day_v = day.unwrap_or(if high {
                days_in_month(year, month_v)
            } else {
                1
            });
            let date = format!("{year:04}-{month_v:02}-{day_v:02}");
            if ty.eq_ignore_ascii_case("dateTime") || ty.eq_ignore_ascii_case("instant") {
                if s.contains('T') {
                    return None;
                }
                let (time, zone) = if high {
                    ("23:59:59.999", "-12:00")
                } else {
                    ("00:00:00.000", "+14:00")
                };
                Some(Value::String(format!("{date}T{time}{zone}")))
            } else {
                Some(Value::String(date))
            }
        }
        _ => None,
    }
}

/// The key a reference points at: the id after the last `Type/`.
fn reference_key(item: &Item, ty: Option<&str>) -> Option<Value> {
    let reference = item.value.get("reference")?.as_str()?;
    let mut parts = reference.rsplit('/');
    let id = parts.next()?;
    let rtype = parts.next()?;
    if ty.is_some_and(|t| t != rtype) {
        return None;
    }
    Some(Value::String(id.to_owned()))
}

/// Evaluates `expr` on `focus`.
pub fn eval(expr: &Expr, focus: &[Item], env: &Env<'_>) -> Result<Vec<Item>, Error> {
    Ok(match expr {
        Expr::Literal(item) => vec![item.clone()],
        Expr::Empty => Vec::new(),
        Expr::This => focus.to_vec(),
        Expr::Const(name) if name == "rowIndex" => {
            vec![Item::new(Value::Number(env.row_index.into()))]
        }
        Expr::Const(name) => {
            let (_, item) = env
                .constants
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| eval_err(format!("unknown constant %{name}")))?;
            vec![item.clone()]
        }
        Expr::Member(target, name) => {
            let base = match target {
                Some(t) => eval(t, focus, env)?,
                None => focus.to_vec(),
            };
            member(&base, name)
        }
        Expr::Index(target, index) => {
            let base = eval(target, focus, env)?;
            let i = eval(index, focus, env)?;
            match i.as_slice() {
                [
                    Item {
                        value: Value::Number(n),
                        ..
                    },
                ] => n
                    .as_u64()
                    .and_then(|i| base.get(i as usize).cloned())
                    .into_iter()
                    .collect(),
                _ => return Err(eval_err("an index must be one integer")),
            }
        }
        Expr::Negate(inner) => eval(inner, focus, env)?
            .into_iter()
            .map(|i| {
                let v = num(&i.value).ok_or_else(|| eval_err("only numbers can be negated"))?;
                Ok(Item::new(number(-v, i.value.is_i64())))
            })
            .collect::<Result<_, Error>>()?,
        Expr::Binary(op, l, r) => binary(op, &eval(l, focus, env)?, &eval(r, focus, env)?)?,
        Expr::Call(target, name, args) => {
            let base = match target {
                Some(t) => eval(t, focus, env)?,
                None => focus.to_vec(),
            };
            call(name, &base, args, env)?
        }
    })
}

fn binary(op: &str, l: &[Item], r: &[Item]) -> Result<Vec<Item>, Error> {
    Ok(match op {
        "and" | "or" | "xor" | "implies" => {
            let (a, b) = (single_bool(l, op)?, single_bool(r, op)?);
            boolean(match op {
                "and" => match (a, b) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                "or" => match (a, b) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                "xor" => a.zip(b).map(|(a, b)| a != b),
                _ => match (a, b) {
                    (Some(false), _) | (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                },
            })
        }
        "|" => {
            let mut out = l.to_vec();
            for item in r {
                if !out.iter().any(|o| equal(&o.value, &item.value)) {
                    out.push(item.clone());
                }
            }
            out
        }
        _ if l.is_empty() || r.is_empty() => Vec::new(),
        "=" | "!=" | "~" | "!~" => {
            let same = l.len() == r.len()
                && l.iter()
                    .zip(r)
                    .all(|(a, b)| match (op, &a.value, &b.value) {
                        ("~" | "!~", Value::String(x), Value::String(y)) => {
                            x.to_lowercase() == y.to_lowercase()
                        }
                        _ => equal(&a.value, &b.value),
                    });
            boolean(Some(same == (op == "=" || op == "~")))
        }
        _ if l.len() > 1 || r.len() > 1 => {
            return Err(eval_err(format!("`{op}` needs single values")));
        }
        "<" | "<=" | ">" | ">=" => {
            let ord = compare(&l[0].value, &r[0].value);
            boolean(ord.map(|o| match op {
                "<" => o.is_lt(),
                "<=" => o.is_le(),
                ">" => o.is_gt(),
                _ => o.is_ge(),
            }))
        }
        "&" | "+" if l[0].value.is_string() || r[0].value.is_string() => {
            let text = |v: &Value| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            };
            vec![Item::new(Value::String(
                text(&l[0].value) + &text(&r[0].value),
            ))]
        }
        _ => {
            let (Some(a), Some(b)) = (num(&l[0].value), num(&r[0].value)) else {
                return Err(eval_err(format!("`{op}` needs numbers")));
            };
            let ints = l[0].value.is_i64() && r[0].value.is_i64();
            let v = match op {
                "+" => number(a + b, ints),
                "-" => number(a - b, ints),
                "*" => number(a * b, ints),
                "/" if b == 0.0 => return Ok(Vec::new()),
                "/" => number(a / b, false),
                "div" if b == 0.0 => return Ok(Vec::new()),
                "div" => number((a / b).trunc(), true),
                "mod" if b == 0.0 => return Ok(Vec::new()),
                "mod" => number(a % b, ints),
                other => return Err(eval_err(format!("unsupported operator `{other}`"))),
            };
            vec![Item::new(v)]
        }
    })
}

fn call(name: &str, base: &[Item], args: &[Expr], env: &Env<'_>) -> Result<Vec<Item>, Error> {
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(eval_err(format!("{name}() takes {n} argument(s)")))
        }
    };
    let type_arg = |e: &Expr| match e {
        Expr::Member(None, t) => Ok(t.clone()),
        _ => Err(eval_err(format!("{name}() needs a type name"))),
    };
    let filter = |criteria: &Expr| -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        for item in base {
            let keep = eval(criteria, std::slice::from_ref(item), env)?;
            if single_bool(&keep, name)? == Some(true) {
                out.push(item.clone());
            }
        }
        Ok(out)
    };
    Ok(match name {
        "where" => {
            arity(1)?;
            filter(&args[0])?
        }
        "select" => {
            arity(1)?;
            let mut out = Vec::new();
            for item in base {
                out.extend(eval(&args[0], std::slice::from_ref(item), env)?);
            }
            out
        }
        "exists" => {
            let found = match args {
                [] => !base.is_empty(),
                [c] => !filter(c)?.is_empty(),
                _ => return Err(eval_err("exists() takes at most one argument")),
            };
            boolean(Some(found))
        }
        "empty" => {
            arity(0)?;
            boolean(Some(base.is_empty()))
        }
        "first" => {
            arity(0)?;
            base.first().cloned().into_iter().collect()
        }
        "last" => {
            arity(0)?;
            base.last().cloned().into_iter().collect()
        }
        "count" => {
            arity(0)?;
            vec![Item::new(Value::Number((base.len() as u64).into()))]
        }
        "not" => {
            arity(0)?;
            boolean(single_bool(base, "not()")?.map(|b| !b))
        }
        "join" => {
            let separator = match args {
                [] => String::new(),
                [s] => match eval(s, base, env)?.as_slice() {
                    [
                        Item {
                            value: Value::String(s),
                            ..
                        },
                    ] => s.clone(),
                    _ => return Err(eval_err("join() takes a string separator")),
                },
                _ => return Err(eval_err("join() takes at most one argument")),
            };
            let parts: Vec<String> = base
                .iter()
                .map(|i| {
                    i.value
                        .as_str()
                        .map_or_else(|| i.value.to_string(), str::to_owned)
                })
                .collect();
            vec![Item::new(Value::String(parts.join(&separator)))]
        }
        "ofType" => {
            arity(1)?;
            let ty = type_arg(&args[0])?;
            base.iter().filter(|i| is_type(i, &ty)).cloned().collect()
        }
        "extension" => {
            arity(1)?;
            let url = match eval(&args[0], base, env)?.as_slice() {
                [
                    Item {
                        value: Value::String(u),
                        ..
                    },
                ] => u.clone(),
                _ => return Err(eval_err("extension() takes a URL string")),
            };
            member(base, "extension")
                .into_iter()
                .filter(|e| e.value.get("url").and_then(Value::as_str) == Some(url.as_str()))
                .collect()
        }
        "getResourceKey" => {
            arity(0)?;
            base.iter()
                .filter_map(|i| i.value.get("id").cloned())
                .map(Item::new)
                .collect()
        }
        "getReferenceKey" => {
            let ty = match args {
                [] => None,
                [t] => Some(type_arg(t)?),
                _ => return Err(eval_err("getReferenceKey() takes at most a type")),
            };
            base.iter()
                .filter_map(|i| reference_key(i, ty.as_deref()))
                .map(Item::new)
                .collect()
        }
        "lowBoundary" | "highBoundary" => {
            arity(0)?;
            base.iter()
                .filter_map(|i| boundary(i, name == "highBoundary"))
                .map(Item::new)
                .collect()
        }
        "toString" => {
            arity(0)?;
            base.iter()
                .map(|i| {
                    Item::new(Value::String(
                        i.value
                            .as_str()
                            .map_or_else(|| i.value.to_string(), str::to_owned),
                    ))
                })
                .collect()
        }
        other => return Err(eval_err(format!("unsupported function {other}()"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(expr: &str, resource: &Value) -> Result<Vec<Value>, Error> {
        let env = Env {
            constants: &[],
            row_index: 0,
        };
        let parsed = parse(expr)?;
        Ok(eval(&parsed, &[Item::new(resource.clone())], &env)?
            .into_iter()
            .map(|i| i.value)
            .collect())
    }

    #[test]
    fn paths_functions_and_operators() {
        let p = json!({"resourceType": "Patient", "id": "p1",
            "name": [{"use": "official", "family": "Kim", "given": ["Minji", "J"]}, {"family": "Lee"}],
            "deceasedBoolean": false,
            "link": [{"other": {"reference": "Patient/p2"}}]});
        assert_eq!(
            run("name.family", &p).unwrap(),
            [json!("Kim"), json!("Lee")]
        );
        assert_eq!(run("Patient.name[1].family", &p).unwrap(), [json!("Lee")]);
        assert_eq!(
            run("name.where(use = 'official').given.join(' ')", &p).unwrap(),
            [json!("Minji J")]
        );
        assert_eq!(
            run("deceased.ofType(boolean) = false and name.exists()", &p).unwrap(),
            [json!(true)]
        );
        assert_eq!(run("(1 + 2) * 3 - 4 / 2", &p).unwrap(), [json!(7.0)]);
        assert_eq!(
            run("link.other.getReferenceKey(Patient)", &p).unwrap(),
            [json!("p2")]
        );
        assert!(
            run("link.other.getReferenceKey(Group)", &p)
                .unwrap()
                .is_empty()
        );
        assert!(run("name.nope = 'x'", &p).unwrap().is_empty());
        assert_eq!(run("{}.empty()", &p).unwrap(), [json!(true)]);
        assert!(matches!(parse("@@"), Err(Error::Parse { .. })));
        assert!(matches!(parse("name.("), Err(Error::Parse { .. })));
    }
}
