//! Which entries `sync` and `verify` cover: rsync rules (`--include`,
//! `--exclude`, in command-line order), then a selection expression (`--select`).

use std::sync::atomic::{AtomicU64, Ordering};

use fleetsync_select::{self as select, Classification, Rule};

/// Which entries a sync or a verify covers.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Selection {
    /// Include entries matching GLOB (rsync rule; order with --exclude matters).
    #[arg(long, value_name = "GLOB", value_parser = parse_glob)]
    pub(crate) include: Vec<Glob>,
    /// Exclude entries matching GLOB (rsync rule; order with --include matters). Excluded
    /// remote entries are left alone: never deleted, never drift.
    #[arg(long, value_name = "GLOB", value_parser = parse_glob)]
    pub(crate) exclude: Vec<Glob>,
    /// Keep only non-directory entries for which EXPR is true.
    #[arg(long, value_name = "EXPR")]
    pub(crate) select: Option<String>,
}

impl Selection {
    /// The rules, in command-line order, and the parsed expression; an
    /// error naming what is wrong with either.
    pub fn classification(&self) -> anyhow::Result<Classification> {
        let select = match &self.select {
            Some(s) => Some(select::parse_expr(s).map_err(|e| anyhow::anyhow!("--select: {e}"))?),
            None => None,
        };
        let c = Classification {
            rules: self.ordered_rules(),
            select,
        };
        c.compile().map_err(|e| match e {
            // A glob of the expression: say which option it is in (rules name theirs).
            select::SelectError::BadGlob { rule: None, .. } => anyhow::anyhow!("--select: {e}"),
            e => anyhow::anyhow!("{e}"),
        })?;
        Ok(c)
    }

    /// The --include/--exclude rules, interleaved in command-line order.
    fn ordered_rules(&self) -> Vec<Rule> {
        let mut all: Vec<(u64, Rule)> = self
            .include
            .iter()
            .map(|g| (g.seq, Rule::include(&g.glob)))
            .chain(self.exclude.iter().map(|g| (g.seq, Rule::exclude(&g.glob))))
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, r)| r).collect()
    }
}

/// A `--include`/`--exclude` value and its place among all such values:
/// clap keeps the two lists apart, while rsync rules apply in the order they
/// were given. clap parses values left to right, so a counter taken at
/// parse time records that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    seq: u64,
    glob: String,
}

impl Glob {
    /// The next value in command-line order.
    pub fn new(glob: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        Glob {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            glob: glob.to_owned(),
        }
    }
}

/// clap's value parser for `--include`/`--exclude`.
fn parse_glob(s: &str) -> Result<Glob, std::convert::Infallible> {
    Ok(Glob::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        selection: Selection,
    }

    #[test]
    fn include_and_exclude_keep_their_command_line_order() {
        let cli = Cli::try_parse_from([
            "x",
            "--exclude",
            "a",
            "--include=b",
            "--select",
            "name:*.c",
            "--exclude=c",
            "--include",
            "d",
        ])
        .unwrap();
        let rules: Vec<(select::RuleKind, String)> = cli
            .selection
            .ordered_rules()
            .into_iter()
            .map(|r| (r.kind, r.pattern))
            .collect();
        use select::RuleKind::{Exclude, Include};
        assert_eq!(
            rules,
            [
                (Exclude, "a".to_owned()),
                (Include, "b".to_owned()),
                (Exclude, "c".to_owned()),
                (Include, "d".to_owned()),
            ]
        );
    }

    #[test]
    fn a_bad_expression_is_an_error_naming_it() {
        let cli = Cli::try_parse_from(["x", "--select", "name:a and"]).unwrap();
        assert!(cli.selection.classification().is_err());
    }
}
