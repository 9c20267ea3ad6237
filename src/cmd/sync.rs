//! `fleetsync sync`: its options, the request they make, and the report of
//! the server's reply (lines, or one JSON document) with the exit code.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use fleetsync_proto::{ClassificationSpec, SyncRequest};

use super::control::{Display, SyncReply};
use super::embedded::FleetOptions;
use super::itemize::{action_name, escape_path};
use super::jsonpath::with_path;
use super::selection::Selection;
use super::target::{Target, Trees};

/// Arguments of `fleetsync sync`.
#[derive(clap::Args)]
#[command(
    override_usage = "fleetsync sync [OPTIONS] MASTER_DIR REMOTE_DIR...\n       \
                      fleetsync sync [OPTIONS] --server ADDR --master AGENT REMOTE_AGENT...",
    after_help = "\
Embedded mode (no --server): starts one agent per directory and the server inside this \
process, on 127.0.0.1 with a random token, and syncs every REMOTE_DIR to MASTER_DIR. \
A REMOTE_DIR that does not exist is created (its parent must exist), shown by -i as \
`mkdir .`; with -n it is not created and planned as empty. The directories must be \
separate trees: one inside another, or the same directory twice (also through a symlink \
or a bind mount), is refused before anything is touched.

With --server: asks a running `fleetsync server` to sync the agents REMOTE_AGENT... \
(host:port) to the agent --master; the token comes from --token-file or FLEETSYNC_TOKEN.

Classification (rsync-like): --include/--exclude GLOB are tried in order, the first match \
decides, unmatched entries are included; `*` does not cross '/', `**` does; a leading '/' \
anchors at the root; a trailing '/' matches only directories; an excluded directory is \
skipped with everything beneath it and protected from --delete. --select EXPR then keeps \
the non-directory entries for which EXPR is true: criteria name:GLOB, path:GLOB, ext:EXT \
joined with and/or/not and parentheses, e.g. --select 'ext:rs or (name:Make* and not path:target/**)'. \
Directories kept by the rules are always synced. --explain PATH prints why PATH is in or out.

Dependency blocks (--blocks FILE, TOML: [block.NAME] with select = EXPR and after = [NAMES]): \
each block's files are staged on the remote and put in place together with its deletions, \
symlinks and attribute changes, under the remote agent's journal, so that after a crash the \
block is all old or all new; blocks run in their `after` order, a failed block's dependents \
are not applied. A bad blocks file is a usage error naming the file and line.

Owner and group are applied when the remote agent runs as root, else skipped with a note. \
FIFOs, sockets and devices are skipped with a note.

Consistency loop: after its transfers each remote checks the files it received (size, \
mtime, inode, its write log, recomputed checksum) and names the inconsistent ones; those \
are synchronized again (fresh checksums on both sides; sent again if they differ) and \
checked again, up to --max-rounds checks (default 3; 1 = check once; 0 = no check). Files \
still inconsistent then fail the remote, each named with why.

Exit codes:
  0  every remote is in sync (or, with -n, the plan was computed)
  1  some changes failed, a remote could not be reached or failed midway, or files were\n     still inconsistent after --max-rounds consistency rounds
  2  usage error, or the server or the master agent could not be reached (a master\n     agent that fails after the start counts as 1)"
)]
pub struct Args {
    /// MASTER_DIR REMOTE_DIR... (embedded) or REMOTE_AGENT... (with --server).
    #[arg(value_name = "PATHS", required_unless_present = "explain")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    target: Target,
    /// Delete entries on the remotes that the master lacks.
    #[arg(long)]
    delete: bool,
    #[command(flatten)]
    selection: Selection,
    /// Dependency blocks (TOML): each block's files are staged on the remote and put in place
    /// together (all old or all new, also across a crash), blocks in their `after` order.
    #[arg(long, value_name = "FILE")]
    blocks: Option<PathBuf>,
    /// Print why PATH (relative to the tree; trailing '/' = directory) is in or out, and exit.
    #[arg(long, value_name = "PATH")]
    explain: Vec<String>,
    /// Only print what would change, one line per entry and action.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Print one line per entry and action also when syncing.
    #[arg(short = 'i', long = "itemize-changes")]
    itemize: bool,
    /// Print the plan and the result as one JSON object on stdout; a path that is not UTF-8
    /// also gets "path_hex", its exact bytes in hex.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: super::token::TokenArgs,
    #[command(flatten)]
    transfer: super::transfer::TransferArgs,
    /// Relay children per node: remotes that need the same files get them through a
    /// distribution tree planned by the server, the master sending to K of them, each
    /// forwarding to K more while it receives (slow remotes at the leaves); 0: the master
    /// sends to every remote itself.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_FANOUT)]
    fanout: u32,
    /// Lock each file while it is synchronized: a shared lock on the master copy while it is
    /// read, an exclusive lock on the remote copy while it is replaced (OFD + flock locks).
    #[arg(long)]
    lock: bool,
    /// With --lock or --lock-resync: wait at most this long for a lock; a file not locked in time fails,
    /// naming the holder.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    lock_timeout: f64,
    /// Consistency checks per remote after its transfers: files found inconsistent are
    /// synchronized again and checked again, at most N checks in all (0: no check).
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_rounds: u32,
    /// Lock the files the consistency loop synchronizes again (as --lock does, with
    /// --lock-timeout), even without --lock.
    #[arg(long)]
    lock_resync: bool,
    /// Embedded mode: do not fsync received files (faster, not crash-safe).
    #[arg(long)]
    no_fsync: bool,
    /// Embedded mode: do not use the agents' checksum cache (every checksum is computed
    /// from the file's bytes; by default a digest is reused while the file's inode, size,
    /// mtime and ctime are unchanged).
    #[arg(long)]
    no_checksum_cache: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    log: super::logging::LogArgs,
}

/// `--fanout` by default: a chain. Every link of the benchmark lab carries as much in as
/// out, so a relay with K children gives each 1/K of its uplink; see benches/fleet_update.sh
/// for the figures.
const DEFAULT_FANOUT: u32 = 1;

/// Inconsistent files the server names in a remote's error message.
const INCONSISTENT_IN_ERROR: usize = 10;

fn json_str(s: &str) -> serde_json::Value {
    serde_json::Value::String(s.to_owned())
}

fn report(
    out: &SyncReply,
    args: &Args,
    labels: &[String],
    elapsed: Duration,
) -> anyhow::Result<u8> {
    let any_failed = out.results.values().any(|r| !r.ok);
    let master_unreachable = !out.results.is_empty()
        && out
            .results
            .values()
            .all(|r| r.error.starts_with("master agent: cannot reach"));
    let code = if (out.results.is_empty() && !out.done_ok) || master_unreachable {
        2
    } else if any_failed || !out.done_ok {
        1
    } else {
        0
    };
    if args.json {
        let remotes: Vec<serde_json::Value> = out
            .results
            .values()
            .map(|r| {
                let plan: Vec<serde_json::Value> = out
                    .items
                    .iter()
                    .filter(|i| i.remote == r.remote)
                    .map(|i| {
                        with_path(
                            serde_json::json!({
                                "action": action_name(i.action),
                                "size": i.size,
                                "detail": i.detail,
                            }),
                            &i.path,
                        )
                    })
                    .collect();
                serde_json::json!({
                    "remote": labels.get(r.remote as usize).map(String::as_str).unwrap_or("?"),
                    "ok": r.ok,
                    "error": if r.error.is_empty() { serde_json::Value::Null } else { json_str(&r.error) },
                    "transferred": r.transferred,
                    "bytes": r.bytes,
                    "wire_bytes": r.wire_bytes,
                    "source": if r.source.is_empty() { "master" } else { r.source.as_str() },
                    "deleted": r.deleted,
                    "changed": r.changed,
                    "failures": r.failures.iter().map(|f| with_path(serde_json::json!({
                        "message": f.message,
                    }), &f.path)).collect::<Vec<_>>(),
                    "rounds": r.rounds,
                    "resynced": r.resynced,
                    "inconsistent": r.inconsistent.iter().map(|f| with_path(serde_json::json!({
                        "message": f.message,
                    }), &f.path)).collect::<Vec<_>>(),
                    "plan": plan,
                })
            })
            .collect();
        let v = serde_json::json!({
            "ok": code == 0,
            "dry_run": args.dry_run,
            "message": out.done_message,
            "elapsed_ms": elapsed.as_millis() as u64,
            "remotes": remotes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    if out.results.is_empty() {
        eprintln!("fleetsync: {}", out.done_message);
        return Ok(code);
    }
    for r in out.results.values() {
        let label = labels
            .get(r.remote as usize)
            .map(String::as_str)
            .unwrap_or("?");
        if !r.error.is_empty() {
            eprintln!("fleetsync: {label}: FAILED: {}", r.error);
        }
        for f in &r.failures {
            if f.path.is_empty() {
                // Not about one path (e.g. a whole block).
                eprintln!("fleetsync: {label}: {}", f.message);
                continue;
            }
            eprintln!(
                "fleetsync: {label}: {}: {}",
                escape_path(&f.path),
                f.message
            );
        }
        // The error names the first few; the others are listed here.
        for f in r.inconsistent.iter().skip(INCONSISTENT_IN_ERROR) {
            eprintln!(
                "fleetsync: {label}: inconsistent {}: {}",
                escape_path(&f.path),
                f.message
            );
        }
        if args.verbose > 0 || !args.dry_run {
            let verb = if args.dry_run { "would send" } else { "sent" };
            let rounds = if args.dry_run {
                String::new()
            } else if r.resynced > 0 {
                format!(
                    ", {} consistency round(s), {} file(s) synchronized again",
                    r.rounds, r.resynced
                )
            } else {
                format!(", {} consistency round(s)", r.rounds)
            };
            let wire = if args.dry_run {
                String::new()
            } else {
                format!(", {} on the wire", r.wire_bytes)
            };
            let via = if r.source.is_empty() || args.dry_run {
                String::new()
            } else {
                format!(" via {}", r.source)
            };
            eprintln!(
                "{label}: {verb} {} files ({} bytes{wire}){via}, {} deleted, {} other changes{rounds}{}",
                r.transferred,
                r.bytes,
                r.deleted,
                r.changed,
                if r.ok { "" } else { " — with failures" }
            );
        }
    }
    Ok(code)
}

/// Runs `fleetsync sync`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    super::logging::init_logging(args.verbose, args.log.log_format);
    let c = args.selection.classification()?;
    if !args.explain.is_empty() {
        let m = c.compile().map_err(|e| anyhow::anyhow!("{e}"))?;
        let master_dir = if args.target.server.is_none() {
            args.paths.first().cloned()
        } else {
            None
        };
        for p in &args.explain {
            let mut p = p.clone();
            if !p.ends_with('/') {
                if let Some(dir) = &master_dir {
                    if dir.join(&p).symlink_metadata().is_ok_and(|m| m.is_dir()) {
                        p.push('/');
                    }
                }
            }
            println!("{}", m.explain(p.as_bytes()));
        }
        return Ok(0);
    }
    args.target.check_algorithm()?;
    let spec = ClassificationSpec::from(&c);
    let blocks = match &args.blocks {
        Some(path) => fleetsync_server::blocks::BlocksFile::load_for_cli(path)
            .map_err(anyhow::Error::msg)?
            .to_defs(),
        None => Vec::new(),
    };
    let start = Instant::now();
    let display = if args.json {
        Display::Collect
    } else {
        Display::Print {
            itemize: args.dry_run || args.itemize,
            progress: !args.dry_run,
        }
    };
    let trees = Trees {
        command: "sync",
        paths: &args.paths,
        auth: &args.auth,
        fleet: FleetOptions {
            fsync: !args.no_fsync,
            checksum_cache: !args.no_checksum_cache,
            record_jobs: true,
            create_missing: !args.dry_run,
        },
    };
    let request = || -> anyhow::Result<SyncRequest> {
        Ok(SyncRequest {
            delete: args.delete,
            dry_run: args.dry_run,
            verify: false,
            classification: spec,
            lock_timeout_ms: lock_timeout_ms(&args)?,
            max_rounds: args.max_rounds,
            lock_resync_ms: lock_resync_ms(&args)?,
            blocks,
            transfer: args.transfer.options()?,
            fanout: args.fanout,
            ..SyncRequest::default()
        })
    };
    let (reply, labels) = args.target.send(trees, request, display)?;
    report(&reply, &args, &labels, start.elapsed())
}

/// `--lock` / `--lock-timeout` as the request carries them.
fn lock_timeout_ms(args: &Args) -> anyhow::Result<Option<u32>> {
    if !(0.0..=86_400.0).contains(&args.lock_timeout) {
        bail!("--lock-timeout must be between 0 and 86400 seconds");
    }
    Ok(args
        .lock
        .then(|| (args.lock_timeout * 1000.0).round() as u32))
}

/// `--lock-resync` / `--lock-timeout` as the request carries them.
fn lock_resync_ms(args: &Args) -> anyhow::Result<Option<u32>> {
    lock_timeout_ms(args).map(|_| {
        args.lock_resync
            .then(|| (args.lock_timeout * 1000.0).round() as u32)
    })
}
