//! `fleetsync server`.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// Arguments of `fleetsync server`.
#[derive(clap::Args)]
#[command(after_help = "\
Control clients (`fleetsync sync --server ADDR ...`) connect here; the server then connects \
to the master and remote agents named in each request, with the same shared token.

Security: with --tls DIR (ca.pem, cert.pem, key.pem from `fleetsync cert issue`) every \
connection is TLS 1.3 with certificates of the fleet CA on both ends, and each end checks the \
other's role (the server accepts control certificates on its listener and requires \
agent certificates from the agents it dials); a token given as well is checked too, inside TLS. Without --tls (token mode, for \
trusted LANs only) the token authenticates the start of each connection and nothing more: \
everything after the handshake travels in plain text, readable by anyone on the path and open \
to changes in flight (no confidentiality, no integrity), and every token holder (every agent) \
can connect to any agent as role agent and write into its tree.

The token comes from --token-file or the FLEETSYNC_TOKEN environment variable.
The first line on stdout is `listening on ADDR` (useful with port 0); under systemd (Type=notify) READY=1 is sent then.

SIGTERM or SIGINT stops the server cleanly: no more connections, running jobs failed in the job history and their control clients told; a second signal stops it at once (exit 1).

Every flag can also be set in a --config file (TOML, keys are the long flag names).

Exit codes: 0 stopped normally (also by SIGTERM/SIGINT), 2 usage or startup error.")]
pub struct Args {
    /// Address to listen on for control clients, e.g. 127.0.0.1:7000 or 127.0.0.1:0.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    auth: super::token::TokenArgs,
    #[command(flatten)]
    metrics: super::metrics::MetricsArgs,
    /// Fail an agent that leaves a request unanswered this many seconds (0 = never).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    idle_timeout: u64,
    /// Job history database [default: $FLEETSYNC_JOBS_DB, else
    /// $XDG_STATE_HOME/fleetsync/jobs.sqlite, else ~/.local/state/fleetsync/jobs.sqlite].
    #[arg(long, value_name = "PATH")]
    jobs_db: Option<PathBuf>,
    /// Never ask agents for compressed frames. By default the server asks every agent it
    /// reaches over a network (not loopback) to send file lists, results and replies
    /// zstd-compressed, and compresses its requests: about a tenth of the bytes for some CPU
    /// (decompressing runs at about 2 GB/s), worth turning off only on links faster than that.
    #[arg(long)]
    no_frame_compression: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    log: super::logging::LogArgs,
    #[command(flatten)]
    config: super::config::ConfigArgs,
}

/// Runs `fleetsync server`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    super::logging::init_logging(args.verbose, args.log.log_format);
    let stop = super::service::StopSignal::install()?;
    let token = args.auth.load()?;
    let tls = match args.auth.load_tls()? {
        Some(id) => Some(
            fleetsync_server::ServerTls::new(&id)
                .map_err(|e| anyhow::anyhow!("--tls {}: {e}", id.dir().display()))?,
        ),
        None => None,
    };
    let addr = args
        .listen
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.listen))?
        .next()
        .with_context(|| format!("resolving {}", args.listen))?;
    let config = fleetsync_server::ServerConfig {
        token,
        tls,
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        jobs_db: Some(super::jobs::db_path(args.jobs_db)?),
        job_labels: Default::default(),
        plain_frames: args.no_frame_compression,
    };
    let mut server = fleetsync_server::Server::bind(addr, config)
        .with_context(|| format!("listening on {}", args.listen))?;
    let metrics = server.metrics();
    let metrics_addr = args.metrics.serve(move || metrics.render())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", server.local_addr()?)?;
    if let Some(a) = metrics_addr {
        writeln!(out, "metrics on {a}")?;
    }
    out.flush()?;
    drop(out);
    super::service::notify_ready(&server.local_addr()?.to_string());
    server.run_until(stop.flag()).context("server event loop")?;
    super::service::notify_stopping();
    tracing::info!("{}: stopping", stop.name());
    server.shutdown(
        &format!("the server was stopped ({})", stop.name()),
        Duration::from_secs(5),
    );
    Ok(0)
}
