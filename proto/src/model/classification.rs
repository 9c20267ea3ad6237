//! Which files take part, in its wire form ([`ClassificationSpec`], with the
//! [`Selector`] tree of `--select`), and its conversion to and from
//! `fleetsync_select::Classification`, where parsing and matching live.

use super::wire::{read_list, text, write_list};
use crate::fleetsync_capnp as schema;
use crate::ProtoError;

/// One node of a `--select` expression tree (the wire form; parsing and
/// evaluation live in `select`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Matches everything.
    All,
    /// Glob on the last path component.
    Name(String),
    /// Glob on the whole relative path.
    Path(String),
    /// Extension, without the dot.
    Ext(String),
    /// All must match.
    And(Vec<Selector>),
    /// Any must match.
    Or(Vec<Selector>),
    /// Must not match.
    Not(Box<Selector>),
}

/// One `--include`/`--exclude` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    /// `--exclude` (true) or `--include` (false).
    pub exclude: bool,
    /// The glob.
    pub pattern: String,
}

/// Which files take part, as sent on the wire: rules (first match wins),
/// then the selector (`None` = everything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClassificationSpec {
    /// Include/exclude rules in command-line order.
    pub rules: Vec<FilterRule>,
    /// The `--select` expression.
    pub select: Option<Selector>,
}

impl Selector {
    fn write_to(&self, mut b: schema::selector::Builder<'_>) {
        match self {
            Selector::All => b.set_all(()),
            Selector::Name(s) => b.set_name(s.as_str()),
            Selector::Path(s) => b.set_path(s.as_str()),
            Selector::Ext(s) => b.set_ext(s.as_str()),
            Selector::And(v) => write_list(b.init_and(v.len() as u32), v, Selector::write_to),
            Selector::Or(v) => write_list(b.init_or(v.len() as u32), v, Selector::write_to),
            Selector::Not(s) => s.write_to(b.init_not()),
        }
    }

    fn read_from(r: schema::selector::Reader<'_>) -> Result<Self, ProtoError> {
        use schema::selector::Which as S;
        Ok(match r.which()? {
            S::All(()) => Selector::All,
            S::Name(t) => Selector::Name(text(t)?),
            S::Path(t) => Selector::Path(text(t)?),
            S::Ext(t) => Selector::Ext(text(t)?),
            S::And(l) => Selector::And(read_list(l?, Selector::read_from)?),
            S::Or(l) => Selector::Or(read_list(l?, Selector::read_from)?),
            S::Not(s) => Selector::Not(Box::new(Selector::read_from(s?)?)),
        })
    }
}

impl ClassificationSpec {
    /// Fills a capnp builder.
    pub fn write_to(&self, mut b: schema::classification::Builder<'_>) {
        let rules = b.reborrow().init_rules(self.rules.len() as u32);
        write_list(rules, &self.rules, |r, mut rb| {
            rb.set_exclude(r.exclude);
            rb.set_pattern(r.pattern.as_str());
        });
        if let Some(s) = &self.select {
            s.write_to(b.init_select());
        }
    }

    /// Reads from a capnp reader.
    pub fn read_from(r: schema::classification::Reader<'_>) -> Result<Self, ProtoError> {
        let rules = read_list(r.get_rules()?, |rr| {
            Ok(FilterRule {
                exclude: rr.get_exclude(),
                pattern: text(rr.get_pattern())?,
            })
        })?;
        let select = if r.has_select() {
            Some(Selector::read_from(r.get_select()?)?)
        } else {
            None
        };
        Ok(ClassificationSpec { rules, select })
    }

    /// Reads an optional field: an absent classification means everything.
    pub(super) fn read_optional<'a>(
        present: bool,
        get: impl FnOnce() -> capnp::Result<schema::classification::Reader<'a>>,
    ) -> Result<Self, ProtoError> {
        if present {
            ClassificationSpec::read_from(get()?)
        } else {
            Ok(ClassificationSpec::default())
        }
    }
}

impl From<&fleetsync_select::Classification> for ClassificationSpec {
    fn from(c: &fleetsync_select::Classification) -> Self {
        use fleetsync_select::{Expr, RuleKind};
        /// The operands of a chain of one operator, flattened: the wire
        /// limits nesting, and `a or b or c ...` must not nest at all.
        fn operands(e: &Expr, and: bool) -> Vec<Selector> {
            let mut out = Vec::new();
            let mut todo = vec![e];
            while let Some(e) = todo.pop() {
                match (e, and) {
                    (Expr::And(a, b), true) | (Expr::Or(a, b), false) => {
                        todo.push(b);
                        todo.push(a);
                    }
                    _ => out.push(conv(e)),
                }
            }
            out
        }
        fn conv(e: &Expr) -> Selector {
            match e {
                Expr::Name(s) => Selector::Name(s.clone()),
                Expr::Path(s) => Selector::Path(s.clone()),
                Expr::Ext(s) => Selector::Ext(s.clone()),
                Expr::And(..) => Selector::And(operands(e, true)),
                Expr::Or(..) => Selector::Or(operands(e, false)),
                Expr::Not(a) => Selector::Not(Box::new(conv(a))),
            }
        }
        ClassificationSpec {
            rules: c
                .rules
                .iter()
                .map(|r| FilterRule {
                    exclude: r.kind == RuleKind::Exclude,
                    pattern: r.pattern.clone(),
                })
                .collect(),
            select: c.select.as_ref().map(conv),
        }
    }
}

impl From<&ClassificationSpec> for fleetsync_select::Classification {
    fn from(c: &ClassificationSpec) -> Self {
        use fleetsync_select::{Expr, Rule};
        fn everything() -> Expr {
            Expr::Path("**".into())
        }
        /// Joins the operands into a balanced tree: a list of thousands of
        /// operands must not become thousands of levels of recursion.
        fn fold(v: &[Selector], and: bool) -> Expr {
            match v {
                [] if and => everything(),
                [] => Expr::Not(Box::new(everything())),
                [one] => conv(one),
                _ => {
                    let (l, r) = v.split_at(v.len().div_ceil(2));
                    let (l, r) = (Box::new(fold(l, and)), Box::new(fold(r, and)));
                    if and {
                        Expr::And(l, r)
                    } else {
                        Expr::Or(l, r)
                    }
                }
            }
        }
        fn conv(s: &Selector) -> Expr {
            match s {
                Selector::All => everything(),
                Selector::Name(g) => Expr::Name(g.clone()),
                Selector::Path(g) => Expr::Path(g.clone()),
                Selector::Ext(g) => Expr::Ext(g.clone()),
                Selector::And(v) => fold(v, true),
                Selector::Or(v) => fold(v, false),
                Selector::Not(a) => Expr::Not(Box::new(conv(a))),
            }
        }
        fleetsync_select::Classification {
            rules: c
                .rules
                .iter()
                .map(|r| {
                    if r.exclude {
                        Rule::exclude(r.pattern.clone())
                    } else {
                        Rule::include(r.pattern.clone())
                    }
                })
                .collect(),
            select: match &c.select {
                None | Some(Selector::All) => None,
                Some(s) => Some(conv(s)),
            },
        }
    }
}
