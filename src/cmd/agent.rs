//! `fleetsync agent`.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{bail, Context};

/// Arguments of `fleetsync agent`.
#[derive(clap::Args)]
#[command(after_help = "\
The token (shared by the server and every agent) comes from --token-file or the \
FLEETSYNC_TOKEN environment variable; it never travels on the network \
(HMAC-SHA256 challenge-response).

Security: with --tls DIR (ca.pem, cert.pem, key.pem from `fleetsync cert issue`) every \
connection is TLS 1.3 with certificates of the fleet CA on both ends, and each end checks the \
other's role (this agent accepts the server's certificate and other agents', and \
requires an agent's from the remote agents it sends to); a token given as well is checked too, inside TLS. Without --tls (token mode, for \
trusted LANs only) the token authenticates the start of each connection and nothing more: \
everything after the handshake travels in plain text, readable by anyone on the path and open \
to changes in flight (no confidentiality, no integrity), and every token holder (every agent) \
can connect to any agent as role agent and write into its tree.

The first line on stdout is `listening on ADDR` (useful with port 0); under systemd (Type=notify) READY=1 is sent then.

SIGTERM or SIGINT stops the agent cleanly: no more connections, the file being received kept as its partial file or removed (never torn under its name), verified files committed, open blocks rolled back; a second signal stops it at once (exit 1).

Every flag can also be set in a --config file (TOML, keys are the long flag names).

Exit codes: 0 stopped normally (also by SIGTERM/SIGINT), 2 usage or startup error.")]
pub struct Args {
    /// The tree to serve.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070 or 127.0.0.1:0.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    auth: super::token::TokenArgs,
    #[command(flatten)]
    metrics: super::metrics::MetricsArgs,
    /// Do not fsync received files before renaming them (faster, not crash-safe).
    #[arg(long)]
    no_fsync: bool,
    /// Do not keep a checksum cache (by default digests are reused while a file's inode,
    /// size, mtime and ctime are unchanged; kept in ~/.cache/fleetsync).
    #[arg(long)]
    no_checksum_cache: bool,
    /// The agent's write log: every file it receives is recorded (size, mtime, inode,
    /// checksum) for the consistency check after a sync; must be outside the tree
    /// [default: ~/.cache/fleetsync/writes-HASH, one per tree].
    #[arg(long, value_name = "FILE")]
    write_log: Option<PathBuf>,
    /// Keep up to SIZE (e.g. 2GiB) of the versions of files this agent sends, by content
    /// hash and outside the tree, so that the next release goes to remotes still on one of
    /// them as a zstd patch against it (0: keep none).
    #[arg(long, value_name = "SIZE", default_value = "0")]
    keep_versions: bytesize::ByteSize,
    /// Where --keep-versions keeps them; must be outside the tree
    /// [default: ~/.cache/fleetsync/versions-HASH, one per tree].
    #[arg(long, value_name = "DIR")]
    versions_dir: Option<PathBuf>,
    /// Serve lists, checksums and sends, and refuse every write (received files, deletes,
    /// attributes, links, blocks): e.g. a master test system that must never change.
    #[arg(long)]
    read_only: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    log: super::logging::LogArgs,
    #[command(flatten)]
    config: super::config::ConfigArgs,
}

/// How long a clean stop waits for the connections' handlers (a commit's fsyncs) to end.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Gives `agent` its write log: `explicit` (an error if unusable, e.g. inside the tree), else
/// the default place beside the checksum cache — or, if that is unusable (say the tree is the
/// home directory holding it), records in memory only, with a warning.
pub(crate) fn with_write_log(
    mut agent: fleetsync_agent::Agent,
    root: &std::path::Path,
    explicit: Option<&std::path::Path>,
) -> anyhow::Result<fleetsync_agent::Agent> {
    if let Some(file) = explicit {
        return agent
            .with_write_log(Some(file))
            .map_err(|e| anyhow::anyhow!("--write-log: {e}"));
    }
    if let Some(file) = fleetsync_agent::consistency::default_write_log(root) {
        if let Err(e) = agent.set_write_log(Some(&file)) {
            tracing::warn!("no write log ({e}): the consistency records stay in memory");
        }
    }
    Ok(agent)
}

/// Keeps glibc's malloc from holding freed memory: one arena for every thread (with one per
/// thread, blocks freed after a checksum answer or a received group stay resident in the arena
/// of the thread that made them) and a fixed mmap threshold (the adaptive one rises with every
/// large block freed, after which such blocks come from the arenas and fragment them).
/// Measured with 200,000 small files (benches/small_files.sh), peak RSS after the re-syncs:
/// remote agent 45.4 MiB -> 33.0, master 39.7 -> 29.0, with no slower copy or re-sync.
/// Allocator settings are the process's, so they are made here and not in the library.
fn compact_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tunables; it is called before the agent starts
    // its threads, and both values are in the documented ranges.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Runs `fleetsync agent`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    compact_malloc();
    super::logging::init_logging(args.verbose, args.log.log_format);
    let stop = super::service::StopSignal::install()?;
    let token = args.auth.load()?;
    let tls = args.auth.load_tls()?;
    let meta =
        std::fs::metadata(&args.root).with_context(|| format!("root {}", args.root.display()))?;
    if !meta.is_dir() {
        bail!("root {} is not a directory", args.root.display());
    }
    let backend = fleetsync_agent::PosixBackend::new(&args.root)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_fsync(!args.no_fsync)
        .with_checksum_cache(!args.no_checksum_cache);
    let agent = fleetsync_agent::Agent::new(&args.root, token, Some(std::sync::Arc::new(backend)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut agent = with_write_log(agent, &args.root, args.write_log.as_deref())?
        .with_read_only(args.read_only);
    if let Some(id) = &tls {
        agent = agent
            .with_tls(id)
            .map_err(|e| anyhow::anyhow!("--tls {}: {e}", id.dir().display()))?;
    }
    if args.keep_versions.as_u64() > 0 {
        let dir = match &args.versions_dir {
            Some(d) => d.clone(),
            None => fleetsync_agent::sumcache::default_file(&args.root)
                .and_then(|f| {
                    let name = f
                        .file_name()?
                        .to_string_lossy()
                        .replace("sums-", "versions-");
                    Some(f.with_file_name(name))
                })
                .context(
                    "--keep-versions: no cache directory ($HOME unset); give --versions-dir",
                )?,
        };
        let inside = std::fs::canonicalize(&args.root).ok().is_some_and(|root| {
            std::fs::create_dir_all(&dir).is_ok()
                && std::fs::canonicalize(&dir).is_ok_and(|d| d.starts_with(&root))
        });
        if inside {
            bail!(
                "--versions-dir {} is inside the tree {}",
                dir.display(),
                args.root.display()
            );
        }
        let store = fleetsync_agent::VersionStore::open(&dir, args.keep_versions.as_u64())
            .with_context(|| format!("--versions-dir {}", dir.display()))?;
        agent = agent.with_versions(std::sync::Arc::new(store));
    }
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let metrics = agent.metrics();
    let metrics_addr = args.metrics.serve(move || metrics.render())?;
    let handle = agent.serve(listener).context("starting the agent")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", handle.local_addr())?;
    if let Some(a) = metrics_addr {
        writeln!(out, "metrics on {a}")?;
    }
    out.flush()?;
    drop(out);
    super::service::notify_ready(&handle.local_addr().to_string());
    let sig = stop.wait();
    super::service::notify_stopping();
    tracing::info!("{sig}: stopping");
    let report = handle.stop_gracefully(STOP_LIMIT);
    if !report.all_ended {
        tracing::warn!(
            "stopped with connections still finishing after {} s",
            STOP_LIMIT.as_secs()
        );
    }
    Ok(0)
}
