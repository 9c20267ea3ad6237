//! The blocks file of `fleetsync sync --blocks FILE`: named groups of files that are
//! synchronized (staged, verified and moved into place) together, in a stated order.
//!
//! # Format
//!
//! TOML, one table per block under `block`:
//!
//! ```toml
//! # Binaries first: the new config may need the new binary.
//! [block.binaries]
//! select = "path:usr/lib/app/** or path:usr/bin/app"
//!
//! [block.config]
//! select = "path:etc/app/** and ext:conf"
//! after = ["binaries"]          # or: after = "binaries"
//! ```
//!
//! - A block name is 1–64 characters of `A-Z a-z 0-9 _ -`, starting with a letter or digit.
//! - `select` is a classification expression, the same language as `--select` (`name:`,
//!   `path:`, `ext:` joined with `and`/`or`/`not` and parentheses), checked when the file is
//!   parsed and kept as text; [`BlocksFile::matchers`] compiles them (`fleetsync_select`).
//! - `after` names blocks that must be completely in place before this one starts.
//!   Unknown names and cycles are errors (a cycle error names the whole cycle).
//! - Unknown keys are errors, so that a typo (`selct`) is not silently ignored.
//!
//! A file belongs to the first block, in file order, whose `select` matches it
//! ([`BlocksFile::assign`]); a file in no block is synchronized on its own, as without
//! `--blocks`. Blocks run in [`BlocksFile::order`]: a topological order of `after`, ties
//! broken by file order.
//!
//! ```
//! use fleetsync_server::blocks::BlocksFile;
//! let file = BlocksFile::parse(r#"
//!     [block.config]
//!     select = "path:etc/**"
//!     after = "binaries"
//!     [block.binaries]
//!     select = "path:usr/bin/**"
//! "#).unwrap();
//! let order: Vec<&str> = file.order().map(|b| b.name.as_str()).collect();
//! assert_eq!(order, ["binaries", "config"]);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Longest block name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Errors of a blocks file; each names the block or the position at fault.
#[derive(Debug)]
#[non_exhaustive]
pub enum BlocksError {
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The text is not valid TOML, or a block table has the wrong shape.
    Syntax {
        /// The parser's message (with line and column).
        message: String,
    },
    /// A block name is not acceptable.
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A block has an empty `select`.
    EmptySelect {
        /// The block.
        block: String,
    },
    /// A block's `after` names a block that does not exist.
    UnknownAfter {
        /// The block.
        block: String,
        /// The unknown name.
        after: String,
    },
    /// The `after` relations form a cycle.
    Cycle {
        /// The blocks of the cycle, in order; the first follows the last.
        cycle: Vec<String>,
    },
    /// A block's `select` is not a valid classification expression.
    BadSelect {
        /// The block.
        block: String,
        /// The parser's message (with the column in the expression).
        message: String,
    },
    /// The file defines no block.
    NoBlocks,
}

impl fmt::Display for BlocksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => {
                write!(f, "cannot read blocks file {}: {source}", path.display())
            }
            Self::Syntax { message } => write!(f, "blocks file: {message}"),
            Self::InvalidName { name, reason } => {
                write!(f, "blocks file: invalid block name {name:?}: {reason}")
            }
            Self::EmptySelect { block } => {
                write!(f, "blocks file: block {block:?} has an empty select")
            }
            Self::UnknownAfter { block, after } => write!(
                f,
                "blocks file: block {block:?} comes after {after:?}, which is not defined"
            ),
            Self::Cycle { cycle } => {
                write!(f, "blocks file: the `after` relations form a cycle: ")?;
                for name in cycle {
                    write!(f, "{name} -> ")?;
                }
                write!(f, "{}", cycle.first().map_or("", String::as_str))
            }
            Self::BadSelect { block, message } => {
                write!(
                    f,
                    "blocks file: block {block:?} has a bad select: {message}"
                )
            }
            Self::NoBlocks => write!(f, "blocks file defines no [block.NAME] table"),
        }
    }
}

impl std::error::Error for BlocksError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One block of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// Its name.
    pub name: String,
    /// The classification expression selecting its files (unevaluated text).
    pub select: String,
    /// Blocks that must be in place before this one.
    pub after: Vec<String>,
}

/// A parsed and checked blocks file.
#[derive(Clone, Debug)]
pub struct BlocksFile {
    blocks: Vec<BlockSpec>,
    order: Vec<usize>,
    /// Each block's `select`, compiled once when the file is checked (file order).
    matchers: Arc<[fleetsync_select::Matcher]>,
}

/// Two blocks files are equal when their blocks are: the matchers are compiled from them.
impl PartialEq for BlocksFile {
    fn eq(&self, other: &Self) -> bool {
        self.blocks == other.blocks && self.order == other.order
    }
}

impl Eq for BlocksFile {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    block: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    select: String,
    #[serde(default)]
    after: After,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum After {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Checks a block name (see the module docs).
pub fn validate_name(name: &str) -> Result<(), BlocksError> {
    let bad = |reason| {
        Err(BlocksError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 64 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad("only letters, digits, `_` and `-` are allowed");
    }
    Ok(())
}

impl BlocksFile {
    /// Reads and parses a blocks file.
    pub fn load(path: &Path) -> Result<Self, BlocksError> {
        let text = std::fs::read_to_string(path).map_err(|source| BlocksError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks the text of a blocks file.
    pub fn parse(text: &str) -> Result<Self, BlocksError> {
        let syntax = |e: toml::de::Error| BlocksError::Syntax {
            message: e.to_string().trim_end().to_owned(),
        };
        let raw: RawFile = toml::from_str(text).map_err(syntax)?;
        let mut blocks = Vec::new();
        for (name, value) in raw.block.unwrap_or_default() {
            validate_name(&name)?;
            let raw: RawBlock =
                value
                    .try_into()
                    .map_err(|e: toml::de::Error| BlocksError::Syntax {
                        message: format!("block {name:?}: {}", e.message()),
                    })?;
            if raw.select.trim().is_empty() {
                return Err(BlocksError::EmptySelect { block: name });
            }
            let after = match raw.after {
                After::None => Vec::new(),
                After::One(a) => vec![a],
                After::Many(v) => v,
            };
            blocks.push(BlockSpec {
                name,
                select: raw.select,
                after,
            });
        }
        Self::new(blocks)
    }

    /// Checks blocks given directly (in file order) and computes their order.
    pub fn new(blocks: Vec<BlockSpec>) -> Result<Self, BlocksError> {
        if blocks.is_empty() {
            return Err(BlocksError::NoBlocks);
        }
        let index = |name: &str| blocks.iter().position(|b| b.name == name);
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(blocks.len());
        let mut matchers = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            validate_name(&b.name)?;
            if b.select.trim().is_empty() {
                return Err(BlocksError::EmptySelect {
                    block: b.name.clone(),
                });
            }
            match compile_select(&b.select) {
                Ok(m) => matchers.push(m),
                Err(message) => {
                    return Err(BlocksError::BadSelect {
                        block: b.name.clone(),
                        message,
                    })
                }
            }
            if index(&b.name) != Some(i) {
                return Err(BlocksError::Syntax {
                    message: format!("block {:?} is defined twice", b.name),
                });
            }
            let mut d = Vec::new();
            for a in &b.after {
                let j = index(a).ok_or_else(|| BlocksError::UnknownAfter {
                    block: b.name.clone(),
                    after: a.clone(),
                })?;
                if !d.contains(&j) {
                    d.push(j);
                }
            }
            deps.push(d);
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(BlocksError::Cycle {
                cycle: cycle.into_iter().map(|i| blocks[i].name.clone()).collect(),
            });
        }
        // Kahn's algorithm, always taking the earliest ready block in file order.
        let mut placed = vec![false; blocks.len()];
        let mut order = Vec::with_capacity(blocks.len());
        while order.len() < blocks.len() {
            let next = (0..blocks.len())
                .find(|&i| !placed[i] && deps[i].iter().all(|&d| placed[d]))
                .expect("acyclic graph always has a ready block");
            placed[next] = true;
            order.push(next);
        }
        Ok(Self {
            blocks,
            order,
            matchers: matchers.into(),
        })
    }

    /// The blocks in file order.
    pub fn blocks(&self) -> &[BlockSpec] {
        &self.blocks
    }

    /// The block named `name`.
    pub fn get(&self, name: &str) -> Option<&BlockSpec> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// The blocks in the order they are to be synchronized.
    pub fn order(&self) -> impl Iterator<Item = &BlockSpec> {
        self.order.iter().map(|&i| &self.blocks[i])
    }

    /// The blocks as a sync request carries them (file order).
    pub fn to_defs(&self) -> Vec<fleetsync_proto::BlockDef> {
        self.blocks
            .iter()
            .map(|b| fleetsync_proto::BlockDef {
                name: b.name.clone(),
                select: b.select.clone(),
                after: b.after.clone(),
            })
            .collect()
    }

    /// Reads a blocks file for the command line: an error names the file and, where it
    /// concerns one block, the line of its `[block.NAME]` header (`FILE:LINE: problem`);
    /// syntax errors carry their own line and column.
    pub fn load_for_cli(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read blocks file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| match error_line(&text, &e) {
            Some(line) => format!("{}:{line}: {e}", path.display()),
            None => format!("{}: {e}", path.display()),
        })
    }

    /// The indexes (into [`blocks`](Self::blocks)) of the blocks in their order.
    pub fn order_indexes(&self) -> &[usize] {
        &self.order
    }

    /// The indexes of the blocks that block `i` comes after.
    pub fn after_indexes(&self, i: usize) -> Vec<usize> {
        self.blocks[i]
            .after
            .iter()
            .filter_map(|a| self.blocks.iter().position(|b| &b.name == a))
            .collect()
    }

    /// One compiled matcher per block (file order): `is_included(path, false)` says whether
    /// a file belongs to that block's `select`.
    pub fn matchers(&self) -> &[fleetsync_select::Matcher] {
        &self.matchers
    }

    /// The block a file belongs to: the first in file order whose `select` expression the
    /// caller's evaluator accepts for that file, or `None`.
    pub fn assign(&self, mut selects: impl FnMut(&str) -> bool) -> Option<&BlockSpec> {
        self.blocks.iter().find(|b| selects(&b.select))
    }
}

/// Parses and compiles a `select` expression (the `--select` language).
fn compile_select(select: &str) -> Result<fleetsync_select::Matcher, String> {
    let expr = fleetsync_select::parse_expr(select).map_err(|e| e.to_string())?;
    fleetsync_select::Classification {
        rules: Vec::new(),
        select: Some(expr),
    }
    .compile()
    .map_err(|e| e.to_string())
}

/// The line (1-based) of the text where the error is, when it concerns one block: the line
/// of that block's `[block.NAME]` header. (Syntax errors carry their own line and column.)
pub fn error_line(text: &str, err: &BlocksError) -> Option<usize> {
    let block = match err {
        BlocksError::InvalidName { name, .. } => name,
        BlocksError::EmptySelect { block }
        | BlocksError::UnknownAfter { block, .. }
        | BlocksError::BadSelect { block, .. } => block,
        BlocksError::Cycle { cycle } => cycle.first()?,
        _ => return None,
    };
    let headers = [
        format!("[block.{block}]"),
        format!("[block.\"{block}\"]"),
        format!("[block.'{block}']"),
    ];
    text.lines()
        .position(|l| {
            let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            headers.iter().any(|h| l.starts_with(h.as_str()))
        })
        .map(|n| n + 1)
}

/// Finds a cycle in the dependency graph (`deps[i]` = blocks `i` comes after), returned in
/// `after` order starting from its earliest-declared member.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(i: usize, deps: &[Vec<usize>], marks: &mut [Mark], path: &mut Vec<usize>) -> bool {
        marks[i] = Mark::OnPath;
        path.push(i);
        for &d in &deps[i] {
            let mark = marks[d];
            if mark == Mark::OnPath {
                let start = path.iter().position(|&p| p == d).expect("on path");
                path.drain(..start);
                return true;
            }
            if mark == Mark::New && visit(d, deps, marks, path) {
                return true;
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        false
    }
    let mut marks = vec![Mark::New; deps.len()];
    for i in 0..deps.len() {
        let mut path = Vec::new();
        if marks[i] == Mark::New && visit(i, deps, &mut marks, &mut path) {
            let min = path.iter().enumerate().min_by_key(|(_, &b)| b)?.0;
            path.rotate_left(min);
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(f: &BlocksFile) -> Vec<&str> {
        f.order().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn order_follows_after_and_then_file_order() {
        let f = BlocksFile::parse(
            r#"
            [block.app-config]
            select = "path:etc/app/** and ext:conf"
            after = ["app-bin", "libs"]
            [block.docs]
            select = "path:usr/share/doc/**"
            [block.app-bin]
            select = "path:usr/bin/app"
            after = "libs"
            [block.libs]
            select = "path:usr/lib/**"
            "#,
        )
        .unwrap();
        assert_eq!(names(&f), ["docs", "libs", "app-bin", "app-config"]);
        assert_eq!(f.blocks()[0].name, "app-config");
        assert_eq!(f.get("app-bin").unwrap().after, ["libs"]);
        assert_eq!(f.get("libs").unwrap().select, "path:usr/lib/**");
    }

    #[test]
    fn a_cycle_is_an_error_naming_the_cycle() {
        let err = BlocksFile::parse(
            r#"
            [block.free]
            select = "name:x"
            [block.a]
            select = "name:a"
            after = "c"
            [block.b]
            select = "name:b"
            after = "a"
            [block.c]
            select = "name:c"
            after = ["b", "free"]
            "#,
        )
        .unwrap_err();
        match &err {
            BlocksError::Cycle { cycle } => assert_eq!(cycle, &["a", "c", "b"]),
            other => panic!("{other}"),
        }
        assert_eq!(
            err.to_string(),
            "blocks file: the `after` relations form a cycle: a -> c -> b -> a"
        );
    }

    #[test]
    fn a_bad_select_names_the_block_and_its_line() {
        let text = "[block.ok]\nselect = \"name:a\"\n\n[block.broken]\nselect = \"ext:rs and\"\n";
        let err = BlocksFile::parse(text).unwrap_err();
        assert!(
            matches!(&err, BlocksError::BadSelect { block, .. } if block == "broken"),
            "{err}"
        );
        assert!(err.to_string().contains("\"broken\""), "{err}");
        assert_eq!(error_line(text, &err), Some(4));
    }

    #[test]
    fn matchers_select_files_as_in_select() {
        let f = BlocksFile::parse(
            "[block.conf]\nselect = \"path:etc/** and ext:conf\"\n[block.rest]\nselect = \"name:*\"\n",
        )
        .unwrap();
        let m = f.matchers();
        assert!(m[0].is_included(b"etc/app/a.conf", false));
        assert!(!m[0].is_included(b"etc/app/a.txt", false));
        assert!(!m[0].is_included(b"usr/a.conf", false));
        assert!(m[1].is_included(b"usr/a.conf", false));
    }

    #[test]
    fn a_block_after_itself_is_a_cycle() {
        let err = BlocksFile::parse("[block.a]\nselect = \"name:a\"\nafter = \"a\"\n").unwrap_err();
        assert!(matches!(err, BlocksError::Cycle { ref cycle } if cycle == &["a"]));
    }

    #[test]
    fn unknown_after_names_both_blocks() {
        let err =
            BlocksFile::parse("[block.a]\nselect = \"name:a\"\nafter = [\"ghost\"]\n").unwrap_err();
        assert!(err.to_string().contains("\"a\"") && err.to_string().contains("\"ghost\""));
    }

    #[test]
    fn bad_files_are_rejected_with_a_reason() {
        let cases = [
            ("", "no [block"),
            ("[block]\n", "no [block"),
            ("[block.\"a b\"]\nselect = \"x\"\n", "invalid block name"),
            ("[block.\"-a\"]\nselect = \"x\"\n", "start with"),
            ("[block.a]\nselect = \"  \"\n", "empty select"),
            ("[block.a]\nselct = \"x\"\n", "selct"),
            ("[block.a]\n", "select"),
            ("[block.a]\nselect = \"x\"\nafter = 3\n", "block \"a\""),
            ("[blocks.a]\nselect = \"x\"\n", "blocks"),
            (
                "[block.a]\nselect = \"x\"\n[block.a]\nselect = \"y\"\n",
                "duplicate",
            ),
            ("[block.a\n", "blocks file"),
        ];
        for (text, needle) in cases {
            let err = BlocksFile::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err:?} lacks {needle:?}");
        }
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(validate_name(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn a_file_goes_to_the_first_matching_block() {
        let f = BlocksFile::parse(
            "[block.b]\nselect = \"ext:conf\"\n[block.a]\nselect = \"path:etc/**\"\n",
        )
        .unwrap();
        // A stand-in evaluator: etc/app.conf matches both expressions.
        let assigned = f.assign(|expr| expr == "ext:conf" || expr == "path:etc/**");
        assert_eq!(assigned.unwrap().name, "b");
        assert!(f.assign(|_| false).is_none());
    }

    #[test]
    fn load_names_the_missing_file() {
        let err = BlocksFile::load(Path::new("/nonexistent/blocks.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/blocks.toml"));
    }
}
