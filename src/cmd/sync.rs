//! `fleetsync sync`: the control client, and the embedded default that runs
//! the agents and the server in this process.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::jsonpath::with_path;
use super::selection::{Selection, Target};
use anyhow::{bail, Context};
use fleetsync_proto::{auth, frame, Action, ClassificationSpec, Msg, PlanItem, RemoteResult, Role};

/// Arguments of `fleetsync sync`.
#[derive(clap::Args)]
#[command(
    override_usage = "fleetsync sync [OPTIONS] MASTER_DIR REMOTE_DIR...\n       \
                      fleetsync sync [OPTIONS] --server ADDR --master AGENT REMOTE_AGENT...",
    after_help = "\
Embedded mode (no --server): starts one agent per directory and the server inside this \
process, on 127.0.0.1 with a random token, and syncs every REMOTE_DIR to MASTER_DIR.

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
    pub(crate) selection: Selection,
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
}

/// rsync-style escaping of a path for one-line output: `\#ooo` for control
/// bytes and backslashes, invalid UTF-8 bytes likewise.
pub fn escape_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\#{b:03o}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\#{b:03o}"));
        }
    }
    out
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Transfer => "send",
        Action::Delete => "delete",
        Action::Mkdir => "mkdir",
        Action::SetAttrs => "attrs",
        Action::Symlink => "symlink",
        Action::HardLink => "hardlink",
        Action::Skip => "skip",
    }
}

fn item_line(item: &PlanItem, remote_label: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(l) = remote_label {
        s.push_str(l);
        s.push_str(": ");
    }
    let path = if item.path.is_empty() {
        ".".to_owned()
    } else {
        escape_path(&item.path)
    };
    s.push_str(&format!("{:<8} {path}", action_name(item.action)));
    let mut detail = item.detail.clone();
    if item.action == Action::Transfer {
        detail = format!("{detail}, {} bytes", item.size);
    }
    if !detail.is_empty() {
        s.push_str(&format!(" ({detail})"));
    }
    s
}

pub(crate) struct Outcome {
    pub(crate) results: BTreeMap<u32, RemoteResult>,
    pub(crate) items: Vec<PlanItem>,
    pub(crate) done_ok: bool,
    pub(crate) done_message: String,
}

/// Sends the request and reads the server's answers until `syncDone`.
pub(crate) fn drive(
    server: &str,
    token: Option<&[u8]>,
    req: fleetsync_proto::SyncRequest,
    args: &Args,
    labels: &[String],
) -> anyhow::Result<Outcome> {
    let stream =
        TcpStream::connect(server).with_context(|| format!("connecting to the server {server}"))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    {
        let mut both = ReadWrite {
            r: &mut reader,
            w: &mut writer,
        };
        auth::connect(&mut both, token, Role::Control)
            .with_context(|| format!("authenticating with the server {server}"))?;
    }
    frame::write_frame(&mut writer, &Msg::SyncRequest(req).encode())?;
    writer.flush()?;

    let multi = labels.len() > 1;
    let show_items = !args.json && (args.dry_run || args.itemize);
    let bar = if !args.json && !args.dry_run && std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let mut total_bytes: u64 = 0;
    let mut done_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    let mut out = Outcome {
        results: BTreeMap::new(),
        items: Vec::new(),
        done_ok: false,
        done_message: String::new(),
    };
    let stdout = std::io::stdout();
    loop {
        let body = frame::read_frame(&mut reader)
            .context("reading from the server")?
            .context("the server closed the connection before finishing")?;
        match Msg::decode(&body)? {
            Msg::PlanItems(items) => {
                for it in items {
                    if it.action == Action::Transfer {
                        total_bytes += it.size;
                    }
                    if show_items {
                        let label = multi.then(|| labels[it.remote as usize].as_str());
                        let line = item_line(&it, label);
                        match &bar {
                            Some(pb) => pb.println(line),
                            None => {
                                let mut o = stdout.lock();
                                writeln!(o, "{line}")?;
                            }
                        }
                    }
                    if it.action == Action::Skip && !show_items && !args.json {
                        let label = labels[it.remote as usize].as_str();
                        eprintln!(
                            "fleetsync: note: {label}: {} {}",
                            if it.path.is_empty() {
                                String::new()
                            } else {
                                escape_path(&it.path) + ":"
                            },
                            it.detail
                        );
                    }
                    if args.json {
                        out.items.push(it);
                    }
                }
                if let Some(pb) = &bar {
                    pb.set_length(total_bytes);
                }
            }
            Msg::SyncProgress(p) => {
                done_bytes.insert(p.remote, p.done_bytes);
                if let Some(pb) = &bar {
                    pb.set_position(done_bytes.values().sum());
                    pb.set_message(format!("{}/{} files", p.done_files, p.total_files));
                }
            }
            Msg::RemoteResult(r) => {
                out.results.insert(r.remote, r);
            }
            Msg::SyncDone { ok, message } => {
                out.done_ok = ok;
                out.done_message = message;
                break;
            }
            Msg::Error { message, .. } => bail!("server error: {message}"),
            other => bail!("unexpected {} from the server", other.kind_name()),
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(out)
}

struct ReadWrite<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R: std::io::Read, W> std::io::Read for ReadWrite<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for ReadWrite<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Inconsistent files the server names in a remote's error message.
const INCONSISTENT_IN_ERROR: usize = 10;

fn json_str(s: &str) -> serde_json::Value {
    serde_json::Value::String(s.to_owned())
}

fn report(out: &Outcome, args: &Args, labels: &[String], elapsed: Duration) -> anyhow::Result<u8> {
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
            eprintln!(
                "{label}: {verb} {} files ({} bytes), {} deleted, {} other changes{rounds}{}",
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
    super::server::init_logging(args.verbose);
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
    match (&args.target.server, &args.target.master) {
        (Some(server), Some(master)) => {
            if args.paths.is_empty() {
                bail!("name at least one remote agent");
            }
            let token = args.auth.load()?;
            let remotes: Vec<String> = args
                .paths
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let req = fleetsync_proto::SyncRequest {
                master: master.clone(),
                remotes: remotes.clone(),
                algorithm: args.target.algorithm.clone(),
                delete: args.delete,
                dry_run: args.dry_run,
                verify: false,
                classification: spec,
                lock_timeout_ms: lock_timeout_ms(&args)?,
                max_rounds: args.max_rounds,
                lock_resync_ms: lock_resync_ms(&args)?,
                blocks,
            };
            let out = drive(server, token.as_deref(), req, &args, &remotes)?;
            report(&out, &args, &remotes, start.elapsed())
        }
        _ => embedded(&args, spec, blocks, start),
    }
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

/// Starts one in-process agent serving `root` on 127.0.0.1.
pub(crate) fn start_agent(
    root: &Path,
    token: &[u8],
    fsync: bool,
    checksum_cache: bool,
) -> anyhow::Result<fleetsync_agent::AgentHandle> {
    let meta = std::fs::metadata(root).with_context(|| format!("{}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let backend = fleetsync_agent::PosixBackend::new(root)
        .map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?
        .with_fsync(fsync)
        .with_checksum_cache(checksum_cache);
    let agent = fleetsync_agent::Agent::new(root, Some(token.to_vec()), Some(Arc::new(backend)))
        .map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?;
    let agent = super::agent::with_write_log(agent, root, None)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(agent.serve(listener)?)
}

fn embedded(
    args: &Args,
    spec: ClassificationSpec,
    blocks: Vec<fleetsync_proto::BlockDef>,
    start: Instant,
) -> anyhow::Result<u8> {
    if args.paths.len() < 2 {
        bail!("usage: fleetsync sync MASTER_DIR REMOTE_DIR... (or --server ADDR --master AGENT REMOTE...)");
    }
    let token: Vec<u8> = auth::nonce()
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    let mut handles = Vec::new();
    for p in &args.paths {
        handles.push(start_agent(
            p,
            &token,
            !args.no_fsync,
            !args.no_checksum_cache,
        )?);
    }
    let config = fleetsync_server::ServerConfig {
        token: Some(token.clone()),
        idle_timeout: None,
        jobs_db: Some(super::jobs::db_path(None)?),
        job_labels: handles
            .iter()
            .zip(&args.paths)
            .map(|(h, p)| (h.local_addr().to_string(), p.display().to_string()))
            .collect(),
    };
    let mut server = fleetsync_server::Server::bind("127.0.0.1:0".parse()?, config)?;
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
    let req = fleetsync_proto::SyncRequest {
        master: handles[0].local_addr().to_string(),
        remotes: handles[1..]
            .iter()
            .map(|h| h.local_addr().to_string())
            .collect(),
        algorithm: args.target.algorithm.clone(),
        delete: args.delete,
        dry_run: args.dry_run,
        verify: false,
        classification: spec,
        lock_timeout_ms: lock_timeout_ms(args)?,
        max_rounds: args.max_rounds,
        lock_resync_ms: lock_resync_ms(args)?,
        blocks,
    };
    let result = drive(&server_addr.to_string(), Some(&token), req, args, &labels);
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    for h in handles {
        h.stop();
    }
    let out = result?;
    report(&out, args, &labels, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_like_rsync() {
        assert_eq!(escape_path(b"a b"), "a b");
        assert_eq!(escape_path(b"a\nb"), "a\\#012b");
        assert_eq!(escape_path(b"\xffx"), "\\#377x");
    }
}
