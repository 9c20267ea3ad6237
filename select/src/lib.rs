//! fleetsync-select: which entries of a tree take part in a sync.
//!
//! A [`Classification`] is what the user typed (`--include`, `--exclude`,
//! `--select`); the server sends it to every agent, and each agent compiles it
//! once with [`Classification::compile`] and asks the resulting [`Matcher`]
//! about every entry it walks.
//!
//! ```
//! use fleetsync_select::{parse_expr, Classification, Decision, Rule};
//!
//! let c = Classification {
//!     rules: vec![Rule::exclude("target/"), Rule::exclude("*.o")],
//!     select: Some(parse_expr("ext:rs or name:Cargo.*").unwrap()),
//! };
//! let m = c.compile().unwrap();
//! assert_eq!(m.decide(b"src/main.rs", false), Decision::Include);
//! assert_eq!(m.decide(b"src/main.o", false), Decision::Exclude);
//! assert_eq!(m.decide(b"target", true), Decision::ExcludePrune);
//! assert_eq!(m.decide(b"README.md", false), Decision::Exclude);
//! assert_eq!(m.decide(b"docs", true), Decision::Include);
//! ```
//!
//! # Semantics
//!
//! **Rules** (`--include GLOB` / `--exclude GLOB`) follow rsync's filter rules:
//! they are tried in the order given and the first one that matches decides; an
//! entry no rule matches is included.
//! - `*` and `?` never match `/`; `**` matches anything including `/`;
//!   `[...]` is a character class.
//! - A pattern starting with `/` is anchored at the root of the tree
//!   (`/build` matches `build` but not `src/build`). Otherwise it matches at the
//!   end of the path: a pattern without `/` matches the final name (`*.o`), a
//!   pattern with `/` matches the last components (`src/*.rs` matches
//!   `crate/src/lib.rs`).
//! - A pattern ending in `/` matches only directories (`target/`).
//! - A pattern ending in `/***` matches the directory and everything inside.
//!
//! **Directories.** As in rsync, an excluded directory is pruned: nothing
//! beneath it is listed, whatever the later rules say, and with `--delete` it
//! is protected on the remotes (an excluded entry is never deleted). Every
//! directory that the rules keep is listed, even if no file beneath it is
//! selected: the tree structure (and empty directories) is synced, just as
//! rsync's common `--include='*/' --include=... --exclude='*'` idiom does.
//!
//! **Selection** (`--select EXPR`) is applied after the rules, to every
//! non-directory entry the rules keep: the entry takes part only if EXPR is
//! true. EXPR joins criteria with `and`, `or`, `not` and parentheses (`not`
//! binds tightest, then `and`, then `or`):
//! - `name:GLOB` — the final name matches GLOB;
//! - `path:GLOB` — the whole relative path matches GLOB (`*` does not cross `/`,
//!   `**` does);
//! - `ext:EXT` — the final name ends with `.EXT` (case-sensitive, a leading dot
//!   in EXT is ignored; `ext:tar.gz` works; `.bashrc` has no extension).
//!
//! A value may be quoted with `"` or `'` to hold spaces: `name:"my file*"`.

#![deny(missing_docs)]

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

/// Whether a rule includes or excludes what it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// `--include GLOB`.
    Include,
    /// `--exclude GLOB`.
    Exclude,
}

/// One `--include` / `--exclude` rule, as typed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Include or exclude.
    pub kind: RuleKind,
    /// The rsync-style pattern.
    pub pattern: String,
}

impl Rule {
    /// An `--include` rule.
    pub fn include(pattern: impl Into<String>) -> Self {
        Rule {
            kind: RuleKind::Include,
            pattern: pattern.into(),
        }
    }

    /// An `--exclude` rule.
    pub fn exclude(pattern: impl Into<String>) -> Self {
        Rule {
            kind: RuleKind::Exclude,
            pattern: pattern.into(),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = match self.kind {
            RuleKind::Include => "--include",
            RuleKind::Exclude => "--exclude",
        };
        write!(f, "{opt} '{}'", self.pattern)
    }
}

/// A `--select` expression tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `name:GLOB`: the final path component matches.
    Name(String),
    /// `path:GLOB`: the whole relative path matches.
    Path(String),
    /// `ext:EXT`: the final component ends with `.EXT`.
    Ext(String),
    /// Both sides are true.
    And(Box<Expr>, Box<Expr>),
    /// Either side is true.
    Or(Box<Expr>, Box<Expr>),
    /// The inner expression is false.
    Not(Box<Expr>),
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Name(g) => write!(f, "name:{}", quote_value(g)),
            Expr::Path(g) => write!(f, "path:{}", quote_value(g)),
            Expr::Ext(e) => write!(f, "ext:{}", quote_value(e)),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::Not(a) => write!(f, "not {a}"),
        }
    }
}

fn quote_value(v: &str) -> String {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '(' | ')' | '"' | '\''));
    if plain {
        return v.to_owned();
    }
    // The tokenizer joins adjacent quoted runs, so a quote character is
    // written inside the other kind of quotes: a"b c -> "a"'"'"b c".
    let mut out = String::new();
    let mut run = String::new();
    for c in v.chars() {
        if c == '"' || c == '\'' {
            if !run.is_empty() {
                out.push_str(&format!("\"{run}\""));
                run.clear();
            }
            let q = if c == '"' { '\'' } else { '"' };
            out.extend([q, c, q]);
        } else {
            run.push(c);
        }
    }
    if !run.is_empty() || out.is_empty() {
        out.push_str(&format!("\"{run}\""));
    }
    out
}

/// Everything the user said about which entries take part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classification {
    /// `--include` / `--exclude` rules in command-line order.
    pub rules: Vec<Rule>,
    /// The `--select` expression, if any.
    pub select: Option<Expr>,
}

impl Classification {
    /// Whether this classification lets everything through.
    pub fn is_everything(&self) -> bool {
        self.rules.is_empty() && self.select.is_none()
    }

    /// Compiles the globs once, for matching many paths.
    pub fn compile(&self) -> Result<Matcher, SelectError> {
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| CompiledRule::new(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let select = self.select.as_ref().map(CompiledExpr::new).transpose()?;
        Ok(Matcher {
            source: self.clone(),
            rules,
            select,
        })
    }
}

/// Errors of classification: a bad glob or a bad `--select` expression.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SelectError {
    /// A glob did not compile.
    BadGlob {
        /// The pattern as typed.
        pattern: String,
        /// What globset said.
        reason: String,
        /// The rule it is from (`--include` / `--exclude`); `None`: a `name:`/`path:` glob of
        /// the select expression.
        rule: Option<RuleKind>,
    },
    /// `--select` did not parse.
    Parse(ParseError),
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::BadGlob {
                pattern,
                reason,
                rule: Some(kind),
            } => {
                let option = match kind {
                    RuleKind::Include => "--include",
                    RuleKind::Exclude => "--exclude",
                };
                write!(f, "{option} '{pattern}': invalid pattern: {reason}")
            }
            SelectError::BadGlob {
                pattern,
                reason,
                rule: None,
            } => write!(f, "invalid pattern '{pattern}': {reason}"),
            SelectError::Parse(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SelectError {}

impl From<ParseError> for SelectError {
    fn from(e: ParseError) -> Self {
        SelectError::Parse(e)
    }
}

/// A `--select` syntax error, naming the position (1-based column, in
/// characters) and the offending token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based column of the offending token.
    pub column: usize,
    /// The offending token (`end of expression` at the end).
    pub token: String,
    /// What was expected or what is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "column {}, at {}: {}",
            self.column, self.token, self.message
        )
    }
}

impl std::error::Error for ParseError {}

/// What a [`Matcher`] says about one entry (its ancestors assumed included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// List it.
    Include,
    /// Do not list it.
    Exclude,
    /// A directory: do not list it and do not descend into it.
    ExcludePrune,
}

fn glob(pattern: &str, shown: &str, rule: Option<RuleKind>) -> Result<GlobMatcher, SelectError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| SelectError::BadGlob {
            pattern: shown.to_owned(),
            reason: e.kind().to_string(),
            rule,
        })
}

fn as_path(bytes: &[u8]) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(bytes))
}

fn file_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

#[derive(Debug)]
struct CompiledRule {
    index: usize,
    rule: Rule,
    dir_only: bool,
    globs: Vec<GlobMatcher>,
}

impl CompiledRule {
    fn new(index: usize, rule: &Rule) -> Result<Self, SelectError> {
        let mut p = rule.pattern.as_str();
        if p.is_empty() {
            return Err(SelectError::BadGlob {
                pattern: p.to_owned(),
                reason: "empty pattern".into(),
                rule: Some(rule.kind),
            });
        }
        let mut with_contents = false;
        if let Some(stripped) = p.strip_suffix("/***") {
            p = stripped;
            with_contents = true;
        }
        let mut dir_only = false;
        if !with_contents {
            while let Some(stripped) = p.strip_suffix('/') {
                p = stripped;
                dir_only = true;
            }
        }
        let anchored = p.starts_with('/');
        let p = p.trim_start_matches('/');
        if p.is_empty() {
            return Err(SelectError::BadGlob {
                pattern: rule.pattern.clone(),
                reason: "pattern names the root".into(),
                rule: Some(rule.kind),
            });
        }
        let base = if anchored {
            p.to_owned()
        } else {
            format!("**/{p}")
        };
        let mut globs = vec![glob(&base, &rule.pattern, Some(rule.kind))?];
        if with_contents {
            globs.push(glob(&format!("{base}/**"), &rule.pattern, Some(rule.kind))?);
        }
        Ok(CompiledRule {
            index,
            rule: rule.clone(),
            dir_only,
            globs,
        })
    }

    fn matches(&self, path: &[u8], is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let p = as_path(path);
        self.globs.iter().any(|g| g.is_match(p))
    }
}

#[derive(Debug)]
enum CompiledExpr {
    Name(String, GlobMatcher),
    Path(String, GlobMatcher),
    Ext(String, Vec<u8>),
    And(Box<CompiledExpr>, Box<CompiledExpr>),
    Or(Box<CompiledExpr>, Box<CompiledExpr>),
    Not(Box<CompiledExpr>),
}

impl CompiledExpr {
    fn new(e: &Expr) -> Result<Self, SelectError> {
        Ok(match e {
            Expr::Name(g) => CompiledExpr::Name(g.clone(), glob(g, g, None)?),
            Expr::Path(g) => CompiledExpr::Path(g.clone(), glob(g, g, None)?),
            Expr::Ext(x) => {
                let x = x.trim_start_matches('.');
                let mut suffix = Vec::with_capacity(x.len() + 1);
                suffix.push(b'.');
                suffix.extend_from_slice(x.as_bytes());
                CompiledExpr::Ext(x.to_owned(), suffix)
            }
            Expr::And(a, b) => CompiledExpr::And(Box::new(Self::new(a)?), Box::new(Self::new(b)?)),
            Expr::Or(a, b) => CompiledExpr::Or(Box::new(Self::new(a)?), Box::new(Self::new(b)?)),
            Expr::Not(a) => CompiledExpr::Not(Box::new(Self::new(a)?)),
        })
    }

    fn eval(&self, path: &[u8]) -> bool {
        match self {
            CompiledExpr::Name(_, g) => g.is_match(as_path(file_name(path))),
            CompiledExpr::Path(_, g) => g.is_match(as_path(path)),
            CompiledExpr::Ext(_, suffix) => {
                let name = file_name(path);
                name.len() > suffix.len() && name.ends_with(suffix)
            }
            CompiledExpr::And(a, b) => a.eval(path) && b.eval(path),
            CompiledExpr::Or(a, b) => a.eval(path) || b.eval(path),
            CompiledExpr::Not(a) => !a.eval(path),
        }
    }

    /// The expression with each criterion's truth value, for `--explain`.
    fn render(&self, path: &[u8], out: &mut String) {
        use std::fmt::Write;
        match self {
            CompiledExpr::Name(g, _) | CompiledExpr::Path(g, _) | CompiledExpr::Ext(g, _) => {
                let key = match self {
                    CompiledExpr::Name(..) => "name",
                    CompiledExpr::Path(..) => "path",
                    _ => "ext",
                };
                let _ = write!(out, "{key}:{} [{}]", quote_value(g), self.eval(path));
            }
            CompiledExpr::And(a, b) | CompiledExpr::Or(a, b) => {
                let op = if matches!(self, CompiledExpr::And(..)) {
                    "and"
                } else {
                    "or"
                };
                out.push('(');
                a.render(path, out);
                let _ = write!(out, " {op} ");
                b.render(path, out);
                out.push(')');
            }
            CompiledExpr::Not(a) => {
                out.push_str("not ");
                a.render(path, out);
            }
        }
    }
}

/// A compiled [`Classification`], cheap to query for every walked entry.
#[derive(Debug)]
pub struct Matcher {
    source: Classification,
    rules: Vec<CompiledRule>,
    select: Option<CompiledExpr>,
}

impl Matcher {
    /// The classification this was compiled from.
    pub fn classification(&self) -> &Classification {
        &self.source
    }

    fn first_rule(&self, path: &[u8], is_dir: bool) -> Option<&CompiledRule> {
        self.rules.iter().find(|r| r.matches(path, is_dir))
    }

    /// Decides one entry, assuming its parent directories are included (a
    /// walker that prunes on [`Decision::ExcludePrune`] guarantees that).
    /// The root itself (empty path) is always included.
    pub fn decide(&self, path: &[u8], is_dir: bool) -> Decision {
        if path.is_empty() {
            return Decision::Include;
        }
        if let Some(r) = self.first_rule(path, is_dir) {
            if r.rule.kind == RuleKind::Exclude {
                return if is_dir {
                    Decision::ExcludePrune
                } else {
                    Decision::Exclude
                };
            }
        }
        if is_dir {
            return Decision::Include;
        }
        match &self.select {
            Some(e) if !e.eval(path) => Decision::Exclude,
            _ => Decision::Include,
        }
    }

    /// Whether `path` is listed, its ancestor directories included.
    pub fn is_included(&self, path: &[u8], is_dir: bool) -> bool {
        self.blocking_ancestor(path).is_none() && self.decide(path, is_dir) == Decision::Include
    }

    fn blocking_ancestor<'p>(&self, path: &'p [u8]) -> Option<(&'p [u8], &CompiledRule)> {
        for (i, &b) in path.iter().enumerate() {
            if b == b'/' && i > 0 {
                let anc = &path[..i];
                if let Some(r) = self.first_rule(anc, true) {
                    if r.rule.kind == RuleKind::Exclude {
                        return Some((anc, r));
                    }
                }
            }
        }
        None
    }

    /// Explains in one line why `path` is in or out. A trailing `/` marks a
    /// directory; the path is relative to the root of the tree.
    pub fn explain(&self, path: &[u8]) -> String {
        let is_dir = path.ends_with(b"/");
        let trimmed = {
            let mut p = path;
            while let Some(rest) = p.strip_suffix(b"/") {
                p = rest;
            }
            while let Some(rest) = p.strip_prefix(b"/") {
                p = rest;
            }
            p
        };
        let shown = String::from_utf8_lossy(path);
        if trimmed.is_empty() {
            return format!("{shown}: included (the root of the tree is always included)");
        }
        if let Some((anc, r)) = self.blocking_ancestor(trimmed) {
            return format!(
                "{shown}: excluded: its directory '{}' is excluded by {} (rule {}), so nothing beneath it is listed",
                String::from_utf8_lossy(anc),
                r.rule,
                r.index + 1
            );
        }
        let rule_part = match self.first_rule(trimmed, is_dir) {
            Some(r) if r.rule.kind == RuleKind::Exclude => {
                let what = if is_dir {
                    ", with everything beneath it"
                } else {
                    ""
                };
                return format!(
                    "{shown}: excluded by {} (rule {}){what}",
                    r.rule,
                    r.index + 1
                );
            }
            Some(r) => format!("included by {} (rule {})", r.rule, r.index + 1),
            None if self.rules.is_empty() => "included (no --include/--exclude rules)".to_owned(),
            None => "included (no rule matches; unmatched entries are included)".to_owned(),
        };
        if is_dir {
            let note = if self.select.is_some() {
                "; --select does not apply to directories"
            } else {
                ""
            };
            return format!("{shown}: {rule_part}{note}");
        }
        match &self.select {
            None => format!("{shown}: {rule_part}"),
            Some(e) => {
                let mut r = String::new();
                e.render(trimmed, &mut r);
                if e.eval(trimmed) {
                    format!("{shown}: {rule_part}; selected: {r} is true")
                } else {
                    format!("{shown}: excluded: not selected by --select: {r} is false ({rule_part} otherwise)")
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The --select parser: recursive descent over a small token list.
//
//   or_expr  := and_expr ("or" and_expr)*
//   and_expr := not_expr ("and" not_expr)*
//   not_expr := "not" not_expr | primary
//   primary  := "(" or_expr ")" | KEY ":" VALUE

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    Criterion { key: String, value: String },
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    column: usize,
    text: String,
}

fn err(t: &Token, message: impl Into<String>) -> ParseError {
    ParseError {
        column: t.column,
        token: if t.tok == Tok::End {
            "end of expression".to_owned()
        } else {
            format!("'{}'", t.text)
        },
        message: message.into(),
    }
}

fn tokenize(s: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '(' || c == ')' {
            out.push(Token {
                tok: if c == '(' { Tok::LParen } else { Tok::RParen },
                column: start + 1,
                text: c.to_string(),
            });
            i += 1;
            continue;
        }
        // A word: runs until whitespace or a parenthesis (a value may hold
        // balanced parentheses and quoted parts).
        let mut key = String::new();
        while i < chars.len()
            && !chars[i].is_whitespace()
            && chars[i] != '('
            && chars[i] != ')'
            && chars[i] != ':'
        {
            key.push(chars[i]);
            i += 1;
        }
        if i < chars.len() && chars[i] == ':' {
            i += 1;
            let mut value = String::new();
            let mut depth = 0usize;
            while i < chars.len() {
                let ch = chars[i];
                if ch == '"' || ch == '\'' {
                    let qcol = i + 1;
                    i += 1;
                    let mut closed = false;
                    while i < chars.len() {
                        if chars[i] == ch {
                            closed = true;
                            i += 1;
                            break;
                        }
                        value.push(chars[i]);
                        i += 1;
                    }
                    if !closed {
                        return Err(ParseError {
                            column: qcol,
                            token: format!("{ch}"),
                            message: "unterminated quote".into(),
                        });
                    }
                    continue;
                }
                if ch.is_whitespace() {
                    break;
                }
                if ch == '(' {
                    depth += 1;
                } else if ch == ')' {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                }
                value.push(ch);
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Token {
                tok: Tok::Criterion { key, value },
                column: start + 1,
                text,
            });
            continue;
        }
        let tok = match key.to_ascii_lowercase().as_str() {
            "and" | "&&" => Tok::And,
            "or" | "||" => Tok::Or,
            "not" | "!" => Tok::Not,
            _ => {
                return Err(ParseError {
                    column: start + 1,
                    token: format!("'{key}'"),
                    message: "expected a criterion (name:GLOB, path:GLOB, ext:EXT), 'not' or '('"
                        .into(),
                })
            }
        };
        out.push(Token {
            tok,
            column: start + 1,
            text: key,
        });
    }
    out.push(Token {
        tok: Tok::End,
        column: chars.len() + 1,
        text: String::new(),
    });
    Ok(out)
}

/// Deepest nesting of parentheses and `not`s accepted: the parser recurses
/// once per level, and a user's expression must not overflow the stack.
const MAX_NESTING: usize = 32;

/// Joins operands into a balanced tree, so that a long `a or b or c ...`
/// chain is O(log n) deep (matching, dropping and the wire all recurse).
fn balanced(mut v: Vec<Expr>, join: fn(Box<Expr>, Box<Expr>) -> Expr) -> Expr {
    if v.len() == 1 {
        return v.pop().expect("one operand");
    }
    let right = v.split_off(v.len().div_ceil(2));
    join(Box::new(balanced(v, join)), Box::new(balanced(right, join)))
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.toks[self.pos]
    }

    fn bump(&mut self) -> Token {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn or_expr(&mut self) -> Result<Expr, ParseError> {
        let mut operands = vec![self.and_expr()?];
        while self.peek().tok == Tok::Or {
            self.bump();
            operands.push(self.and_expr()?);
        }
        Ok(balanced(operands, Expr::Or))
    }

    fn and_expr(&mut self) -> Result<Expr, ParseError> {
        let mut operands = vec![self.not_expr()?];
        while self.peek().tok == Tok::And {
            self.bump();
            operands.push(self.not_expr()?);
        }
        Ok(balanced(operands, Expr::And))
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(err(
                self.peek(),
                format!("nested more than {MAX_NESTING} levels deep"),
            ));
        }
        Ok(())
    }

    fn not_expr(&mut self) -> Result<Expr, ParseError> {
        if self.peek().tok == Tok::Not {
            self.bump();
            self.enter()?;
            let inner = self.not_expr()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let t = self.bump();
        match t.tok {
            Tok::LParen => {
                self.enter()?;
                let inner = self.or_expr()?;
                self.depth -= 1;
                let close = self.bump();
                if close.tok != Tok::RParen {
                    return Err(err(
                        &close,
                        format!(
                            "expected ')' to close the '(' at column {}, or 'and'/'or'",
                            t.column
                        ),
                    ));
                }
                Ok(inner)
            }
            Tok::Criterion { ref key, ref value } => {
                if value.is_empty() {
                    return Err(err(&t, format!("'{key}:' needs a value")));
                }
                match key.as_str() {
                    "name" => {
                        if value.contains('/') {
                            return Err(err(
                                &t,
                                "a name never contains '/'; use path:GLOB to match directories",
                            ));
                        }
                        Ok(Expr::Name(value.clone()))
                    }
                    "path" => {
                        let v = value.trim_start_matches('/');
                        if v.is_empty() {
                            return Err(err(&t, "path: needs a glob such as 'src/**'"));
                        }
                        Ok(Expr::Path(v.to_owned()))
                    }
                    "ext" => {
                        let v = value.trim_start_matches('.');
                        if v.is_empty() || v.contains('/') {
                            return Err(err(
                                &t,
                                "ext: needs an extension such as 'rs' or 'tar.gz'",
                            ));
                        }
                        Ok(Expr::Ext(v.to_owned()))
                    }
                    _ => Err(err(
                        &t,
                        format!("unknown criterion '{key}:' (expected name:, path: or ext:)"),
                    )),
                }
            }
            Tok::End => Err(err(
                &t,
                "expression ends too early: expected a criterion, 'not' or '('",
            )),
            Tok::RParen => Err(err(
                &t,
                "unexpected ')': expected a criterion, 'not' or '('",
            )),
            Tok::And | Tok::Or => Err(err(
                &t,
                "expected a criterion, 'not' or '(' before this operator",
            )),
            Tok::Not => unreachable!("handled by not_expr"),
        }
    }
}

/// Parses a `--select` expression.
///
/// ```
/// use fleetsync_select::{parse_expr, Expr};
/// let e = parse_expr("ext:rs and not path:target/**").unwrap();
/// assert_eq!(e.to_string(), "(ext:rs and not path:target/**)");
/// let err = parse_expr("ext:rs and").unwrap_err();
/// assert_eq!(err.column, 11);
/// ```
pub fn parse_expr(s: &str) -> Result<Expr, ParseError> {
    let toks = tokenize(s)?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let e = p.or_expr()?;
    let t = p.peek().clone();
    if t.tok != Tok::End {
        let msg = match t.tok {
            Tok::RParen => "unmatched ')'",
            _ => "expected 'and', 'or' or the end of the expression",
        };
        return Err(err(&t, msg));
    }
    Ok(e)
}

#[cfg(test)]
mod tests;
