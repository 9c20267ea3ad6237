//! `fleetsync verify`: runs the sync comparison as a dry run whose checksums bypass the
//! agents' caches, and reports every drifted path without changing anything.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use fleetsync_proto::{auth, Action, PlanItem, SyncRequest};

use super::selection::{Selection, Target};
use super::sync::{escape_path, Outcome};

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
}

/// `sync` options for [`super::sync::drive`]: collect the items, print nothing.
#[derive(Parser)]
struct Quiet {
    #[command(flatten)]
    args: super::sync::Args,
}

/// The classification options are passed on (--include and --exclude in their order).
fn quiet_sync_args(args: &Args) -> anyhow::Result<super::sync::Args> {
    let mut argv: Vec<String> = ["sync", "--json", "-n"].map(String::from).to_vec();
    argv.extend(args.selection.to_args());
    argv.push("-".into());
    Ok(Quiet::try_parse_from(argv)?.args)
}

/// Runs `fleetsync verify`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    super::server::init_logging(args.verbose);
    args.target.check_algorithm()?;
    let sync_args = quiet_sync_args(&args)?;
    let classification =
        fleetsync_proto::ClassificationSpec::from(&args.selection.classification()?);
    let request = |master: String, remotes: Vec<String>| SyncRequest {
        master,
        remotes,
        algorithm: args.target.algorithm.clone(),
        // Extra remote entries are drift; nothing is deleted (dry run).
        delete: true,
        dry_run: true,
        verify: true,
        classification: classification.clone(),
        ..SyncRequest::default()
    };
    match (&args.target.server, &args.target.master) {
        (Some(server), Some(master)) => {
            let token = args.auth.load()?;
            let remotes: Vec<String> = args
                .paths
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let req = request(master.clone(), remotes.clone());
            let out = super::sync::drive(server, token.as_deref(), req, &sync_args, &remotes)?;
            Ok(report(&out, &remotes, args.json))
        }
        _ => {
            if args.paths.len() < 2 {
                bail!("usage: fleetsync verify MASTER_DIR REMOTE_DIR... (or --server ADDR --master AGENT REMOTE...)");
            }
            let token: Vec<u8> = auth::nonce()
                .iter()
                .flat_map(|b| format!("{b:02x}").into_bytes())
                .collect();
            let mut handles = Vec::new();
            for p in &args.paths {
                handles.push(super::sync::start_agent(p, &token, false, false)?);
            }
            let config = fleetsync_server::ServerConfig {
                token: Some(token.clone()),
                ..Default::default()
            };
            let mut server = fleetsync_server::Server::bind("127.0.0.1:0".parse()?, config)
                .context("starting the embedded server")?;
            let server_addr = server.local_addr()?;
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = Arc::clone(&stop);
            let thread = std::thread::Builder::new()
                .name("fleetsync-server".into())
                .spawn(move || server.run_until(&stop2))?;
            let labels: Vec<String> = args.paths[1..]
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let req = request(
                handles[0].local_addr().to_string(),
                handles[1..]
                    .iter()
                    .map(|h| h.local_addr().to_string())
                    .collect(),
            );
            let result = super::sync::drive(
                &server_addr.to_string(),
                Some(&token),
                req,
                &sync_args,
                &labels,
            );
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
            for h in handles {
                h.stop();
            }
            Ok(report(&result?, &labels, args.json))
        }
    }
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

/// Prints the drift; returns the exit code.
/// Prints the drift (lines, or one JSON document) and returns the exit code.
fn report(out: &Outcome, labels: &[String], json: bool) -> u8 {
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
    out: &Outcome,
    labels: &[String],
    errors: &[Option<String>],
    code: u8,
) -> serde_json::Value {
    use super::jsonpath::with_path;
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
        assert_eq!(drift_kind(&item(Action::Transfer, "new")), Some("missing"));
        assert_eq!(
            drift_kind(&item(Action::Transfer, "checksum differs")),
            Some("content")
        );
        assert_eq!(
            drift_kind(&item(Action::Transfer, "size differs")),
            Some("content")
        );
        assert_eq!(
            drift_kind(&item(Action::Delete, "not on master")),
            Some("extra")
        );
        assert_eq!(
            drift_kind(&item(Action::SetAttrs, "mode 0644->0755")),
            Some("attrs")
        );
        assert_eq!(
            drift_kind(&item(Action::Symlink, "target differs -> x")),
            Some("symlink")
        );
        assert_eq!(
            drift_kind(&item(Action::HardLink, "=> a")),
            Some("hardlink")
        );
        assert_eq!(
            drift_kind(&item(Action::Skip, "special file skipped")),
            None
        );
        assert_eq!(drift_kind(&item(Action::SetAttrs, DIR_TOUCHED)), None);
        assert_eq!(drift_kind(&item(Action::SetAttrs, "mtime")), Some("attrs"));
    }

    #[test]
    fn quiet_sync_args_parse() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let a = Cli::try_parse_from([
            "verify",
            "--exclude=*",
            "--select",
            "name:a*",
            "--include",
            "*.rs",
            "m",
            "r",
        ])
        .unwrap()
        .args;
        let sync = quiet_sync_args(&a).unwrap();
        // The sync side sees the same rules, in the same order.
        assert_eq!(
            sync.selection.classification().unwrap(),
            a.selection.classification().unwrap()
        );
    }
}
