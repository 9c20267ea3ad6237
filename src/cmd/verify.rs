//! `fleetsync verify`: runs the sync comparison as a dry run whose checksums bypass the
//! agents' caches, and reports every drifted path without changing anything.

use std::path::PathBuf;

use fleetsync_proto::{Action, ClassificationSpec, PlanItem, SyncRequest};

use super::control::{Display, SyncReply};
use super::embedded::FleetOptions;
use super::itemize::escape_path;
use super::jsonpath::with_path;
use super::selection::Selection;
use super::target::{Target, Trees};

/// Arguments of `fleetsync verify`.
#[derive(clap::Args)]
#[command(
    override_usage = "fleetsync verify [OPTIONS] MASTER_DIR REMOTE_DIR...\n       \
                      fleetsync verify [OPTIONS] --server ADDR --master AGENT REMOTE_AGENT...",
    after_help = "\
Compares every remote with the master like `fleetsync sync --delete -n` (same --include, \
--exclude and --select), but the agents \
read every regular file present on both sides (no checksum cache), and nothing is changed. \
Prints one line per drifted path: REMOTE: KIND PATH (detail), KIND being missing, extra, \
content, type, attrs (mode, owner, mtime), symlink or hardlink. With --json: one document \
{ok, message, remotes: [{remote, verified, error, drift: [{kind, path, detail}], notes}]} \
(a path that is not UTF-8 also gets path_hex, its bytes in hex).

Embedded mode (no --server) checks the directories as `sync` does: they must be separate \
trees (none inside another, not the same directory twice), and a REMOTE_DIR that does \
not exist is compared as an empty tree (`missing .` and every master entry missing); \
nothing is created.

The sync flags that make no difference to a verify (--delete, -n, -i, --lock, \
--lock-timeout, --lock-resync, --max-rounds, --blocks, --no-fsync, --no-checksum-cache, \
--compress, --bwlimit, --master-bwlimit, --no-delta) are accepted and ignored, so that a \
sync command line becomes a verify by changing the word `sync` to `verify`.

Exit codes:
  0  every remote matches the master
  1  drift (listed on stdout)
  2  usage error, or the server or an agent could not be reached"
)]
pub struct Args {
    /// MASTER_DIR REMOTE_DIR... (embedded) or REMOTE_AGENT... (with --server).
    #[arg(value_name = "PATHS", required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    selection: Selection,
    #[command(flatten)]
    auth: super::token::TokenArgs,
    /// Print one JSON document (per remote: verified, error, drift, notes) instead of lines.
    #[arg(long)]
    json: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    log: super::logging::LogArgs,
    #[command(flatten)]
    _ignored: SyncOnlyFlags,
}

/// The flags of `sync` that make no difference to a verify (it always counts extra entries,
/// changes nothing, and reads every file): parsed as `sync` parses them, then ignored.
#[derive(clap::Args)]
#[command(next_help_heading = "Sync flags, accepted and ignored")]
struct SyncOnlyFlags {
    /// Ignored: verify always reports extra remote entries.
    #[arg(long)]
    delete: bool,
    /// Ignored: verify never changes anything.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Ignored: verify always lists every drifted path.
    #[arg(short = 'i', long = "itemize-changes")]
    itemize: bool,
    /// Ignored: verify reads without locking.
    #[arg(long)]
    lock: bool,
    /// Ignored (no locks).
    #[arg(long, value_name = "SECS")]
    lock_timeout: Option<f64>,
    /// Ignored (no consistency loop: nothing is sent).
    #[arg(long, value_name = "N")]
    max_rounds: Option<u32>,
    /// Ignored (no consistency loop).
    #[arg(long)]
    lock_resync: bool,
    /// Ignored: blocks order how changes are applied, not what is compared.
    #[arg(long, value_name = "FILE")]
    blocks: Option<PathBuf>,
    /// Ignored: nothing is written.
    #[arg(long)]
    no_fsync: bool,
    /// Ignored: verify never uses the checksum cache.
    #[arg(long)]
    no_checksum_cache: bool,
    /// Ignored: no file data is sent.
    #[arg(long, value_name = "MODE")]
    compress: Option<String>,
    /// Ignored: no file data is sent.
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// Ignored: no file data is sent.
    #[arg(long, value_name = "RATE")]
    master_bwlimit: Option<String>,
    /// Ignored: no file data is sent.
    #[arg(long)]
    no_delta: bool,
}

/// What verify asks the server: a dry run with `--delete` (extra remote entries are drift;
/// nothing is deleted) whose checksums bypass the agents' caches.
fn request(classification: ClassificationSpec) -> SyncRequest {
    SyncRequest {
        delete: true,
        dry_run: true,
        verify: true,
        classification,
        ..SyncRequest::default()
    }
}

/// Runs `fleetsync verify`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    super::logging::init_logging(args.verbose, args.log.log_format);
    args.target.check_algorithm()?;
    let classification = ClassificationSpec::from(&args.selection.classification()?);
    let trees = Trees {
        command: "verify",
        paths: &args.paths,
        auth: &args.auth,
        // Every file is read: no checksum cache; nothing is written, so nothing to fsync.
        fleet: FleetOptions {
            fsync: false,
            checksum_cache: false,
            record_jobs: false,
            create_missing: false,
        },
    };
    let (reply, labels) =
        args.target
            .send(trees, || Ok(request(classification)), Display::Collect)?;
    Ok(report(&reply, &labels, args.json))
}

/// The kind of drift a planned action stands for; `None`: not drift (a skipped special file,
/// or a directory's mtime the sync would restore only because it changes the contents).
fn drift_kind(item: &PlanItem) -> Option<&'static str> {
    let d = item.detail.as_str();
    Some(match item.action {
        Action::Skip => return None,
        Action::SetAttrs if d == DIR_TOUCHED => return None,
        Action::Delete => "extra",
        Action::Mkdir => "missing",
        Action::Transfer if d.starts_with("new") => "missing",
        Action::Transfer if d.starts_with("type") => "type",
        Action::Transfer if d.contains("hard link") => "hardlink",
        Action::Transfer => "content",
        Action::SetAttrs => "attrs",
        Action::Symlink if d.starts_with("new") => "missing",
        Action::Symlink if d.starts_with("type") => "type",
        Action::Symlink => "symlink",
        Action::HardLink => "hardlink",
    })
}

/// `Why::DirTouched` in the planner's words (server/src/plan.rs).
const DIR_TOUCHED: &str = "directory contents changed";

/// Prints the drift (lines, or one JSON document) and returns the exit code.
fn report(out: &SyncReply, labels: &[String], json: bool) -> u8 {
    let mut drift = vec![0u64; labels.len()];
    for it in &out.items {
        if drift_kind(it).is_some() {
            if let Some(n) = drift.get_mut(it.remote as usize) {
                *n += 1;
            }
        }
    }
    // Why each remote could not be verified, if it could not.
    let errors: Vec<Option<String>> = (0..labels.len())
        .map(|i| match out.results.get(&(i as u32)) {
            Some(r) if !r.ok => Some(r.error.clone()),
            None => Some("no result from the server".to_owned()),
            Some(_) => None,
        })
        .collect();
    let unreachable = errors.iter().any(Option::is_some);
    let code = if unreachable || (!out.done_ok && drift.iter().all(|&n| n == 0)) {
        2
    } else {
        u8::from(drift.iter().any(|&n| n > 0))
    };
    if json {
        let doc = json_report(out, labels, &errors, code);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return code;
    }
    for it in &out.items {
        let label = labels.get(it.remote as usize).map_or("?", String::as_str);
        let path = if it.path.is_empty() {
            ".".to_owned()
        } else {
            escape_path(&it.path)
        };
        match drift_kind(it) {
            Some(kind) if it.detail.is_empty() => println!("{label}: {kind} {path}"),
            Some(kind) => println!("{label}: {kind} {path} ({})", it.detail),
            None if it.action == Action::Skip => {
                eprintln!("fleetsync: note: {label}: {path}: {}", it.detail)
            }
            None => {}
        }
    }
    for ((label, error), n) in labels.iter().zip(&errors).zip(&drift) {
        match error {
            Some(e) => eprintln!("fleetsync: {label}: not verified: {e}"),
            None if *n > 0 => eprintln!("fleetsync: {label}: {n} drifted path(s)"),
            None => eprintln!("fleetsync: {label}: matches the master"),
        }
    }
    if code == 2 && !out.done_message.is_empty() {
        eprintln!("fleetsync: {}", out.done_message);
    }
    code
}

/// The `--json` document: `ok`, `message` (why, when exiting 2), and per remote (in the order
/// given) `remote`, `verified`, `error`, `drift` (`kind`, `path`, `detail`)
/// and `notes` (entries skipped, with why).
fn json_report(
    out: &SyncReply,
    labels: &[String],
    errors: &[Option<String>],
    code: u8,
) -> serde_json::Value {
    // Each remote's items, in one pass over them all.
    let mut by_remote: Vec<Vec<&PlanItem>> = vec![Vec::new(); labels.len()];
    for it in &out.items {
        if let Some(v) = by_remote.get_mut(it.remote as usize) {
            v.push(it);
        }
    }
    let remotes: Vec<serde_json::Value> = labels
        .iter()
        .zip(errors)
        .zip(&by_remote)
        .map(|((label, error), items)| {
            let drift: Vec<_> = items
                .iter()
                .filter_map(|it| {
                    let kind = drift_kind(it)?;
                    Some(with_path(
                        serde_json::json!({ "kind": kind, "detail": it.detail }),
                        &it.path,
                    ))
                })
                .collect();
            let notes: Vec<_> = items
                .iter()
                .filter(|it| drift_kind(it).is_none() && it.action == Action::Skip)
                .map(|it| with_path(serde_json::json!({ "detail": it.detail }), &it.path))
                .collect();
            serde_json::json!({
                "remote": label,
                "verified": error.is_none(),
                "error": error,
                "drift": drift,
                "notes": notes,
            })
        })
        .collect();
    serde_json::json!({
        "ok": code == 0,
        // The server's closing message matters only when it explains a failure.
        "message": (code == 2 && !out.done_message.is_empty()).then_some(&out.done_message),
        "remotes": remotes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(action: Action, detail: &str) -> PlanItem {
        PlanItem {
            remote: 0,
            path: b"p".to_vec(),
            action,
            size: 0,
            detail: detail.into(),
        }
    }

    #[test]
    fn drift_kinds_name_the_reason() {
        let cases = [
            (Action::Transfer, "new", Some("missing")),
            (Action::Transfer, "checksum differs", Some("content")),
            (Action::Transfer, "size differs", Some("content")),
            (Action::Delete, "not on master", Some("extra")),
            (Action::SetAttrs, "mode 0644->0755", Some("attrs")),
            (Action::Symlink, "target differs -> x", Some("symlink")),
            (Action::HardLink, "=> a", Some("hardlink")),
            (Action::Skip, "special file skipped", None),
            (Action::SetAttrs, DIR_TOUCHED, None),
            (Action::SetAttrs, "mtime", Some("attrs")),
        ];
        for (action, detail, kind) in cases {
            assert_eq!(
                drift_kind(&item(action, detail)),
                kind,
                "{action:?} {detail}"
            );
        }
    }

    #[test]
    fn the_request_is_a_cache_free_dry_run_with_delete() {
        let spec = ClassificationSpec::default();
        let req = request(spec.clone());
        assert!(req.delete && req.dry_run && req.verify);
        assert_eq!(req.classification, spec);
        assert_eq!(req.lock_timeout_ms, None);
    }
}
