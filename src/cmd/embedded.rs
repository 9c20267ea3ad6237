//! The embedded fleet of `sync`/`verify` without `--server`: one agent per
//! directory and the server, all in this process on 127.0.0.1 with a random
//! token, stopped when the [`EmbeddedFleet`] is dropped. Before anything starts, the
//! directories are checked to be apart (no tree inside another, by path and by device and
//! inode), and a missing remote directory is created (or stood in for by an empty one).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use fleetsync_agent::AgentHandle;
use fleetsync_proto::auth;

/// How the embedded agents and server work.
#[derive(Clone, Copy, Debug)]
pub struct FleetOptions {
    /// The agents fsync received files.
    pub fsync: bool,
    /// The agents keep and use their checksum cache.
    pub checksum_cache: bool,
    /// The server records its jobs in the job database (see `fleetsync jobs`), naming the
    /// agents by their directories.
    pub record_jobs: bool,
    /// A remote directory that does not exist is created (its parent must exist), as rsync
    /// creates its destination; else (dry runs, verify) it is left absent and the remote is
    /// an empty tree.
    pub create_missing: bool,
}

/// The directories of an embedded fleet (the master first), found to exist (or, for a
/// remote, to have an existing parent) and to be apart from each other.
#[derive(Debug)]
pub struct FleetDirs(Vec<FoundDir>);

impl FleetDirs {
    /// Finds `dirs` (MASTER_DIR REMOTE_DIR...) without changing anything: an error names a
    /// master that is not a directory, a remote that is neither a directory nor missing with
    /// an existing parent directory, or two trees that overlap (the same directory, or one
    /// inside the other, by path or by device and inode).
    pub fn find(dirs: &[PathBuf]) -> anyhow::Result<FleetDirs> {
        let found = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| FoundDir::find(d, i == 0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        check_apart(&found)?;
        Ok(FleetDirs(found))
    }
}

/// Running in-process agents (the first one serving the master directory) and a server
/// that knows their shared token. Dropping it stops them all.
pub struct EmbeddedFleet {
    token: Vec<u8>,
    agents: Vec<AgentHandle>,
    server_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    server_thread: Option<JoinHandle<std::io::Result<()>>>,
    /// Per remote: whether its directory did not exist when the fleet started.
    missing: Vec<bool>,
    /// The empty directories served in place of missing remotes (without `create_missing`);
    /// removed when the fleet is dropped, after its agents stopped.
    _empty_roots: Vec<tempfile::TempDir>,
}

impl EmbeddedFleet {
    /// Starts one agent per directory of `dirs` (the master first), then the server; a
    /// missing remote directory is first created, or with `!options.create_missing` served
    /// as an empty temporary one.
    pub fn start(dirs: FleetDirs, options: FleetOptions) -> anyhow::Result<Self> {
        let found = dirs.0;
        let token: Vec<u8> = auth::nonce()
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect();
        let mut agents = Vec::new();
        let mut empty_roots = Vec::new();
        for dir in &found {
            let served = match (dir.id, options.create_missing) {
                (Some(_), _) => dir.given.clone(),
                (None, true) => {
                    create_root(&dir.given, options.fsync)?;
                    dir.given.clone()
                }
                (None, false) => {
                    let empty = tempfile::Builder::new()
                        .prefix("fleetsync-empty-remote-")
                        .tempdir()
                        .context("a temporary empty directory for a missing remote")?;
                    let path = empty.path().to_owned();
                    empty_roots.push(empty);
                    path
                }
            };
            // The stand-in for a missing remote keeps no write log or checksum cache.
            let real = dir.id.is_some() || options.create_missing;
            agents.push(start_agent(
                &served,
                &token,
                options.fsync,
                options.checksum_cache && real,
                real,
            )?);
        }
        let mut config = fleetsync_server::ServerConfig {
            token: Some(token.clone()),
            ..Default::default()
        };
        if options.record_jobs {
            config.jobs_db = Some(super::jobs::db_path(None)?);
            config.job_labels = agents
                .iter()
                .zip(&found)
                .map(|(h, d)| (h.local_addr().to_string(), d.given.display().to_string()))
                .collect();
        }
        let bound = fleetsync_server::Server::bind("127.0.0.1:0".parse()?, config);
        // Without a job database only the socket can fail, which the error does not name;
        // a job database error names itself.
        let mut server = if options.record_jobs {
            bound?
        } else {
            bound.context("starting the embedded server")?
        };
        let server_addr = server.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_server = Arc::clone(&stop);
        let server_thread = std::thread::Builder::new()
            .name("fleetsync-server".into())
            .spawn(move || server.run_until(&stop_server))?;
        Ok(EmbeddedFleet {
            token,
            agents,
            server_addr,
            stop,
            server_thread: Some(server_thread),
            missing: found[1..].iter().map(|d| d.id.is_none()).collect(),
            _empty_roots: empty_roots,
        })
    }

    /// Per remote (in the order of their directories): whether its directory did not exist
    /// when the fleet started (it was created, or stood in for by an empty one).
    pub fn missing_remotes(&self) -> &[bool] {
        &self.missing
    }

    /// The server's address, for the control client.
    pub fn server_addr(&self) -> String {
        self.server_addr.to_string()
    }

    /// The token the agents and the server share.
    pub fn token(&self) -> &[u8] {
        &self.token
    }

    /// The master agent's address.
    pub fn master(&self) -> String {
        self.agents[0].local_addr().to_string()
    }

    /// The remote agents' addresses, in the order of their directories.
    pub fn remotes(&self) -> Vec<String> {
        self.agents[1..]
            .iter()
            .map(|h| h.local_addr().to_string())
            .collect()
    }
}

impl Drop for EmbeddedFleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.server_thread.take() {
            let _ = thread.join();
        }
        for agent in self.agents.drain(..) {
            agent.stop();
        }
    }
}

/// Starts one in-process agent serving `root` on 127.0.0.1 (with its default write log when
/// `write_log`).
fn start_agent(
    root: &Path,
    token: &[u8],
    fsync: bool,
    checksum_cache: bool,
    write_log: bool,
) -> anyhow::Result<AgentHandle> {
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
    let agent = if write_log {
        super::agent::with_write_log(agent, root, None)?
    } else {
        agent
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(agent.serve(listener)?)
}

/// One directory of the command line, as found before anything starts.
#[derive(Debug)]
struct FoundDir {
    /// As the user named it.
    given: PathBuf,
    /// The master (the first directory) or a remote.
    master: bool,
    /// Its canonical path; for a missing remote, its parent's canonical path and its name.
    canonical: PathBuf,
    /// Device and inode of the directory; `None` when it does not exist (yet).
    id: Option<(u64, u64)>,
}

impl FoundDir {
    /// Finds `given`: an existing directory, or (not for the master) a missing one whose
    /// parent is an existing directory.
    fn find(given: &Path, master: bool) -> anyhow::Result<FoundDir> {
        let role = if master { "master" } else { "remote" };
        let found = |canonical, id| FoundDir {
            given: given.to_owned(),
            master,
            canonical,
            id,
        };
        match std::fs::symlink_metadata(given) {
            Ok(_) => {
                let canonical = std::fs::canonicalize(given)
                    .with_context(|| format!("the {role} {}", given.display()))?;
                let meta = std::fs::metadata(&canonical)
                    .with_context(|| format!("the {role} {}", given.display()))?;
                if !meta.is_dir() {
                    bail!("the {role} {} is not a directory", given.display());
                }
                Ok(found(canonical, Some((meta.dev(), meta.ino()))))
            }
            // ENOTDIR: a parent is not a directory, said below.
            Err(e)
                if !master
                    && (e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR)) =>
            {
                let Some(name) = given.file_name() else {
                    bail!("the remote {}: {e}", given.display());
                };
                let parent = match given.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                let no_parent = |why: String| {
                    anyhow::anyhow!(
                        "the remote {} does not exist and cannot be created: its parent {} {why}",
                        given.display(),
                        parent.display()
                    )
                };
                let canonical_parent = std::fs::canonicalize(parent).map_err(|e| {
                    no_parent(if e.kind() == std::io::ErrorKind::NotFound {
                        "does not exist".into()
                    } else if e.raw_os_error() == Some(libc::ENOTDIR) {
                        "is not a directory".into()
                    } else {
                        format!("cannot be reached ({e})")
                    })
                })?;
                if !std::fs::metadata(&canonical_parent).is_ok_and(|m| m.is_dir()) {
                    return Err(no_parent("is not a directory".into()));
                }
                Ok(found(canonical_parent.join(name), None))
            }
            Err(e) => bail!("the {role} {}: {e}", given.display()),
        }
    }

    /// "the master M" or "the remote R".
    fn named(&self) -> String {
        let role = if self.master { "master" } else { "remote" };
        format!("the {role} {}", self.given.display())
    }
}

/// How one tree stands to another.
#[derive(Debug, PartialEq, Eq)]
enum Overlap {
    /// The same directory: `true` when only their device and inode tell (a bind mount).
    Same { by_inode: bool },
    /// The second lies inside the first.
    Inside { by_inode: bool },
}

/// How `b` stands to `a`: the same tree, inside it, or (`None`) neither. By their canonical
/// paths, and by `a`'s device and inode against `b` and each of its ancestors, which also
/// catches a bind mount of `a` on `b`'s path.
fn overlap(a: &FoundDir, b: &FoundDir) -> Option<Overlap> {
    if a.canonical == b.canonical {
        return Some(Overlap::Same { by_inode: false });
    }
    if b.canonical.starts_with(&a.canonical) {
        return Some(Overlap::Inside { by_inode: false });
    }
    let id = a.id?;
    // A missing `b` has no inode of its own; its ancestors do.
    let skip = usize::from(b.id.is_none());
    for (depth, dir) in b.canonical.ancestors().enumerate().skip(skip) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if (meta.dev(), meta.ino()) == id {
            return Some(if depth == 0 {
                Overlap::Same { by_inode: true }
            } else {
                Overlap::Inside { by_inode: true }
            });
        }
    }
    None
}

/// An error naming two trees of `dirs` that overlap (the same directory, or one inside the
/// other), if any do: syncing them would copy a tree into itself or, with `--delete`,
/// delete the master.
fn check_apart(dirs: &[FoundDir]) -> anyhow::Result<()> {
    for (i, a) in dirs.iter().enumerate() {
        for b in &dirs[i + 1..] {
            let (outer, inner, how) = match (overlap(a, b), overlap(b, a)) {
                (Some(how), _) => (a, b, how),
                (None, Some(how)) => (b, a, how),
                (None, None) => continue,
            };
            let what = match how {
                Overlap::Same { by_inode } => {
                    let (a, b) = (a.named(), b.named());
                    if by_inode {
                        format!("{a} and {b} are the same directory (same device and inode, e.g. a bind mount)")
                    } else {
                        format!(
                            "{a} and {b} are the same directory ({})",
                            inner.canonical.display()
                        )
                    }
                }
                Overlap::Inside { by_inode } => format!(
                    "{} is inside {}{}",
                    inner.named(),
                    outer.named(),
                    if by_inode {
                        " (same device and inode, e.g. a bind mount)"
                    } else {
                        ""
                    }
                ),
            };
            bail!("{what}: the master and each remote must be separate trees; nothing was changed");
        }
    }
    Ok(())
}

/// Creates the missing remote directory `dir` (not its parents), as rsync creates its
/// destination; with `fsync`, makes the new entry durable in its parent.
fn create_root(dir: &Path, fsync: bool) -> anyhow::Result<()> {
    std::fs::create_dir(dir)
        .with_context(|| format!("creating the remote directory {}", dir.display()))?;
    if fsync {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync of {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(dirs: &[&Path]) -> Vec<FoundDir> {
        dirs.iter()
            .enumerate()
            .map(|(i, d)| FoundDir::find(d, i == 0).unwrap())
            .collect()
    }

    #[test]
    fn separate_trees_and_a_missing_sibling_are_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, r, new) = (
            tmp.path().join("m"),
            tmp.path().join("r"),
            tmp.path().join("new"),
        );
        std::fs::create_dir(&m).unwrap();
        std::fs::create_dir(&r).unwrap();
        // "m2" shares a prefix of bytes with "m", not of components.
        let m2 = tmp.path().join("m2");
        std::fs::create_dir(&m2).unwrap();
        check_apart(&found(&[&m, &r, &new, &m2])).unwrap();
    }

    #[test]
    fn a_missing_remote_inside_the_master_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("m");
        std::fs::create_dir(&m).unwrap();
        let err = check_apart(&found(&[&m, &m.join("new")])).unwrap_err();
        assert!(err.to_string().contains("is inside the master"), "{err}");
    }
}
