//! Unit tests of the classification language.

use super::*;

fn m(rules: Vec<Rule>, select: Option<&str>) -> Matcher {
    Classification {
        rules,
        select: select.map(|s| parse_expr(s).unwrap()),
    }
    .compile()
    .unwrap()
}

#[test]
fn no_rules_includes_everything() {
    let m = m(vec![], None);
    assert_eq!(m.decide(b"a/b/c", false), Decision::Include);
    assert_eq!(m.decide(b"a", true), Decision::Include);
    assert!(m.is_included(b"x/y", false));
}

#[test]
fn unanchored_name_pattern_matches_any_depth() {
    let m = m(vec![Rule::exclude("*.o")], None);
    assert_eq!(m.decide(b"a.o", false), Decision::Exclude);
    assert_eq!(m.decide(b"x/y/a.o", false), Decision::Exclude);
    assert_eq!(m.decide(b"x/y/a.oo", false), Decision::Include);
    assert_eq!(m.decide(b"x.o", true), Decision::ExcludePrune);
}

#[test]
fn star_does_not_cross_slash() {
    let m = m(vec![Rule::exclude("/src/*.rs")], None);
    assert_eq!(m.decide(b"src/a.rs", false), Decision::Exclude);
    assert_eq!(m.decide(b"src/x/a.rs", false), Decision::Include);
    let m2 = super::tests::m(vec![Rule::exclude("/src/**.rs")], None);
    assert_eq!(m2.decide(b"src/x/a.rs", false), Decision::Include);
    let m3 = super::tests::m(vec![Rule::exclude("/src/**/*.rs")], None);
    assert_eq!(m3.decide(b"src/x/a.rs", false), Decision::Exclude);
}

#[test]
fn anchored_pattern_only_at_root() {
    let m = m(vec![Rule::exclude("/build")], None);
    assert_eq!(m.decide(b"build", true), Decision::ExcludePrune);
    assert_eq!(m.decide(b"src/build", true), Decision::Include);
}

#[test]
fn pattern_with_slash_matches_trailing_components() {
    let m = m(vec![Rule::exclude("src/*.rs")], None);
    assert_eq!(m.decide(b"crate/src/lib.rs", false), Decision::Exclude);
    assert_eq!(m.decide(b"src/lib.rs", false), Decision::Exclude);
    assert_eq!(m.decide(b"lib.rs", false), Decision::Include);
}

#[test]
fn trailing_slash_only_matches_directories() {
    let m = m(vec![Rule::exclude("target/")], None);
    assert_eq!(m.decide(b"target", true), Decision::ExcludePrune);
    assert_eq!(m.decide(b"target", false), Decision::Include);
    assert!(!m.is_included(b"target/debug/x", false));
    assert!(m.is_included(b"src/x", false));
}

#[test]
fn first_matching_rule_wins() {
    let m = m(vec![Rule::include("keep.o"), Rule::exclude("*.o")], None);
    assert_eq!(m.decide(b"keep.o", false), Decision::Include);
    assert_eq!(m.decide(b"drop.o", false), Decision::Exclude);
    let m = super::tests::m(vec![Rule::exclude("*.o"), Rule::include("keep.o")], None);
    assert_eq!(m.decide(b"keep.o", false), Decision::Exclude);
}

#[test]
fn rsync_idiom_include_dirs_and_txt_exclude_rest() {
    let m = m(
        vec![
            Rule::include("*/"),
            Rule::include("*.txt"),
            Rule::exclude("*"),
        ],
        None,
    );
    assert_eq!(m.decide(b"a", true), Decision::Include);
    assert_eq!(m.decide(b"a/b.txt", false), Decision::Include);
    assert_eq!(m.decide(b"a/b.bin", false), Decision::Exclude);
}

#[test]
fn triple_star_matches_dir_and_contents() {
    let m = m(vec![Rule::include("/keep/***"), Rule::exclude("*")], None);
    assert_eq!(m.decide(b"keep", true), Decision::Include);
    assert_eq!(m.decide(b"keep/a/b", false), Decision::Include);
    assert_eq!(m.decide(b"other", true), Decision::ExcludePrune);
}

#[test]
fn excluded_directory_prunes_everything_beneath() {
    let m = m(vec![Rule::exclude(".git"), Rule::include("*")], None);
    assert_eq!(m.decide(b".git", true), Decision::ExcludePrune);
    assert!(!m.is_included(b".git/config", false));
    assert!(m.explain(b".git/config").contains("its directory '.git'"));
}

#[test]
fn select_applies_to_files_not_dirs() {
    let m = m(vec![], Some("ext:rs"));
    assert_eq!(m.decide(b"src", true), Decision::Include);
    assert_eq!(m.decide(b"src/a.rs", false), Decision::Include);
    assert_eq!(m.decide(b"src/a.c", false), Decision::Exclude);
}

#[test]
fn ext_semantics() {
    let m = m(vec![], Some("ext:.gz"));
    assert_eq!(m.decide(b"a.tar.gz", false), Decision::Include);
    assert_eq!(m.decide(b".gz", false), Decision::Exclude);
    assert_eq!(m.decide(b"a.GZ", false), Decision::Exclude);
    let m2 = super::tests::m(vec![], Some("ext:tar.gz"));
    assert_eq!(m2.decide(b"x/a.tar.gz", false), Decision::Include);
    assert_eq!(m2.decide(b"x/a.gz", false), Decision::Exclude);
}

#[test]
fn name_and_path_criteria() {
    let m = m(vec![], Some("name:Make* or path:docs/**"));
    assert_eq!(m.decide(b"x/Makefile", false), Decision::Include);
    assert_eq!(m.decide(b"docs/a/b.md", false), Decision::Include);
    assert_eq!(m.decide(b"x/docs/a.md", false), Decision::Exclude);
}

#[test]
fn non_utf8_paths_match() {
    let m = m(vec![Rule::exclude("*.bin")], Some("not name:skip*"));
    assert_eq!(m.decide(b"d/\xff\xfe.bin", false), Decision::Exclude);
    assert_eq!(m.decide(b"d/\xff\xfe.txt", false), Decision::Include);
}

#[test]
fn precedence_not_and_or() {
    let e = parse_expr("ext:a or ext:b and not ext:c").unwrap();
    assert_eq!(e.to_string(), "(ext:a or (ext:b and not ext:c))");
    let e = parse_expr("(ext:a or ext:b) and not (ext:c)").unwrap();
    assert_eq!(e.to_string(), "((ext:a or ext:b) and not ext:c)");
    let e = parse_expr("not not ext:a").unwrap();
    assert_eq!(e.to_string(), "not not ext:a");
    let e = parse_expr("EXT:x").unwrap_err();
    assert!(e.message.contains("unknown criterion"), "{e}");
}

#[test]
fn values_with_parens_and_quotes() {
    let e = parse_expr("(name:foo(1).txt or name:\"my file*\")").unwrap();
    assert_eq!(
        e,
        Expr::Or(
            Box::new(Expr::Name("foo(1).txt".into())),
            Box::new(Expr::Name("my file*".into()))
        )
    );
    // Display round-trips.
    assert_eq!(parse_expr(&e.to_string()).unwrap(), e);
}

#[test]
fn parse_errors_name_position_and_token() {
    let e = parse_expr("ext:rs and").unwrap_err();
    assert_eq!((e.column, e.token.as_str()), (11, "end of expression"));
    let e = parse_expr("ext:rs ext:c").unwrap_err();
    assert_eq!((e.column, e.token.as_str()), (8, "'ext:c'"));
    assert!(e.message.contains("expected 'and', 'or'"));
    let e = parse_expr("(ext:rs or name:a").unwrap_err();
    assert!(e.message.contains("column 1"), "{e}");
    let e = parse_expr("ext:rs)").unwrap_err();
    assert_eq!((e.column, e.message.as_str()), (7, "unmatched ')'"));
    let e = parse_expr("foo").unwrap_err();
    assert_eq!((e.column, e.token.as_str()), (1, "'foo'"));
    let e = parse_expr("name:").unwrap_err();
    assert!(e.message.contains("needs a value"));
    let e = parse_expr("name:\"abc").unwrap_err();
    assert_eq!((e.column, e.message.as_str()), (6, "unterminated quote"));
    let e = parse_expr("and ext:a").unwrap_err();
    assert_eq!(e.column, 1);
    let e = parse_expr("").unwrap_err();
    assert!(e.to_string().starts_with("column 1, at end of expression"));
}

#[test]
fn bad_glob_is_reported() {
    let c = Classification {
        rules: vec![Rule::exclude("[abc")],
        select: None,
    };
    let e = c.compile().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--exclude '[abc': invalid pattern"),
        "{e}"
    );
    let c = Classification {
        rules: vec![Rule::exclude("*.o"), Rule::include("a[")],
        select: None,
    };
    let e = c.compile().unwrap_err().to_string();
    assert!(e.starts_with("--include 'a[': invalid pattern"), "{e}");
    let c = Classification {
        rules: Vec::new(),
        select: Some(parse_expr("name:x[").unwrap()),
    };
    let e = c.compile().unwrap_err();
    assert!(
        matches!(e, SelectError::BadGlob { rule: None, .. }),
        "{e:?}"
    );
}

#[test]
fn explain_says_why() {
    let m = m(
        vec![Rule::exclude("*.o"), Rule::include("*.c")],
        Some("not name:skip*"),
    );
    assert_eq!(
        m.explain(b"a/x.o"),
        "a/x.o: excluded by --exclude '*.o' (rule 1)"
    );
    assert_eq!(
        m.explain(b"a/x.c"),
        "a/x.c: included by --include '*.c' (rule 2); selected: not name:skip* [false] is true"
    );
    assert!(m.explain(b"a/skip.c").contains("not selected by --select"));
    assert!(m.explain(b"a/").contains("does not apply to directories"));
    assert!(m.explain(b"x.o/").contains("with everything beneath it"));
}
