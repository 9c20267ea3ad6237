//! `fleetsync jobs`: the server's job history.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use fleetsync_server::jobs::{JobId, JobStore, JobSummary};

/// Arguments of `fleetsync jobs`.
#[derive(clap::Args)]
#[command(after_help = "\
Every sync run by `fleetsync server` or by the embedded `fleetsync sync MASTER REMOTE...` is \
recorded with its start and end, master, remotes, classification and per-remote counts \
(ROUNDS: consistency rounds, the most of any remote). \
A job whose server died mid-way is shown as `interrupted` once the database is opened again.

Exit codes: 0 ok, 1 no such job (show), 2 usage error or unreadable database.")]
pub struct Args {
    /// Job database [default: $FLEETSYNC_JOBS_DB, else $XDG_STATE_HOME/fleetsync/jobs.sqlite,
    /// else ~/.local/state/fleetsync/jobs.sqlite].
    #[arg(long, value_name = "PATH", global = true)]
    db: Option<PathBuf>,
    /// Show at most this many jobs, newest first.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<JobsCommand>,
}

#[derive(clap::Subcommand)]
enum JobsCommand {
    /// Show one job with its per-remote results.
    Show {
        /// The job id (first column of `fleetsync jobs`).
        id: i64,
    },
}

/// The job database path: `explicit`, else `$FLEETSYNC_JOBS_DB`, else
/// `$XDG_STATE_HOME/fleetsync/jobs.sqlite`, else `~/.local/state/fleetsync/jobs.sqlite`.
/// Creates the parent directory.
pub fn db_path(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
    let path = if let Some(p) = explicit {
        p
    } else if let Some(p) = nonempty("FLEETSYNC_JOBS_DB") {
        PathBuf::from(p)
    } else if let Some(state) = nonempty("XDG_STATE_HOME") {
        PathBuf::from(state).join("fleetsync/jobs.sqlite")
    } else if let Some(home) = nonempty("HOME") {
        PathBuf::from(home).join(".local/state/fleetsync/jobs.sqlite")
    } else {
        bail!("no job database: use --jobs-db PATH or set FLEETSYNC_JOBS_DB (HOME is not set)");
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the job database directory {}", dir.display()))?;
    }
    Ok(path)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of milliseconds since the Unix epoch.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn end_column(j: &JobSummary) -> String {
    match j.finished_ms {
        Some(ms) => format!("{} {}", utc(ms), j.status),
        None => j.status.to_string(),
    }
}

/// Runs `fleetsync jobs`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let path = db_path(args.db)?;
    let store = JobStore::open(&path)?;
    let mut out = std::io::stdout().lock();
    match args.command {
        None => {
            let jobs = store.list(args.limit)?;
            if args.json {
                serde_json::to_writer_pretty(&mut out, &jobs)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:>5}  {:19}  {:31}  {:21}  {:24}  {:>7}  {:>7}  {:>7}  {:>12}  {:>6}",
                    "ID",
                    "START (UTC)",
                    "END / STATUS",
                    "MASTER",
                    "REMOTES",
                    "SENT",
                    "DELETED",
                    "FIXED",
                    "BYTES",
                    "ROUNDS"
                )?;
                for j in &jobs {
                    writeln!(
                        out,
                        "{:>5}  {:19}  {:31}  {:21}  {:24}  {:>7}  {:>7}  {:>7}  {:>12}  {:>6}",
                        j.id.0,
                        utc(j.started_ms),
                        end_column(j),
                        j.master,
                        j.remotes.join(","),
                        j.totals.sent,
                        j.totals.deleted,
                        j.totals.fixed,
                        j.totals.bytes,
                        j.totals.rounds
                    )?;
                }
            }
            Ok(0)
        }
        Some(JobsCommand::Show { id }) => {
            let Some(d) = store.get(JobId(id))? else {
                eprintln!("fleetsync: no job {id} in {}", path.display());
                return Ok(1);
            };
            if args.json {
                serde_json::to_writer_pretty(&mut out, &d)?;
                writeln!(out)?;
                return Ok(0);
            }
            let s = &d.summary;
            writeln!(out, "job {}: {}", s.id, s.status)?;
            writeln!(out, "  started     {}", utc(s.started_ms))?;
            if let Some(ms) = s.finished_ms {
                writeln!(out, "  ended       {}", utc(ms))?;
            }
            writeln!(out, "  master      {}", s.master)?;
            writeln!(out, "  algorithm   {}", s.algorithm)?;
            if !s.classification.is_empty() {
                writeln!(out, "  selection   {}", s.classification)?;
            }
            writeln!(out, "  server pid  {}", d.owner_pid)?;
            if let Some(e) = &d.error {
                writeln!(out, "  error       {e}")?;
            }
            for r in &d.results {
                let c = &r.counts;
                writeln!(out, "  remote {}", r.remote)?;
                match r.recorded_ms {
                    Some(ms) => writeln!(
                        out,
                        "    {}: sent {}, deleted {}, fixed {}, bytes {} ({} on the wire), rounds {}",
                        utc(ms),
                        c.sent,
                        c.deleted,
                        c.fixed,
                        c.bytes,
                        c.wire_bytes,
                        c.rounds
                    )?,
                    None => writeln!(out, "    no result recorded")?,
                }
                if let Some(s) = &r.source {
                    writeln!(out, "    via {s}")?;
                }
                if let Some(e) = &r.error {
                    writeln!(out, "    error: {e}")?;
                }
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_like_date_u() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_629_341_999), "2026-11-25 17:55:41");
    }
}
