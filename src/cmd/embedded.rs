//! The embedded fleet of `sync`/`verify` without `--server`: one agent per
//! directory and the server, all in this process on 127.0.0.1 with a random
//! token, stopped when the [`EmbeddedFleet`] is dropped.

use std::net::{SocketAddr, TcpListener};
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
}

/// Running in-process agents (the first one serving the master directory) and a server
/// that knows their shared token. Dropping it stops them all.
pub struct EmbeddedFleet {
    token: Vec<u8>,
    agents: Vec<AgentHandle>,
    server_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    server_thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl EmbeddedFleet {
    /// Starts one agent per directory of `dirs` (the master first), then the server.
    pub fn start(dirs: &[PathBuf], options: FleetOptions) -> anyhow::Result<Self> {
        let token: Vec<u8> = auth::nonce()
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect();
        let mut agents = Vec::new();
        for dir in dirs {
            agents.push(start_agent(
                dir,
                &token,
                options.fsync,
                options.checksum_cache,
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
                .zip(dirs)
                .map(|(h, p)| (h.local_addr().to_string(), p.display().to_string()))
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
        })
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

/// Starts one in-process agent serving `root` on 127.0.0.1.
fn start_agent(
    root: &Path,
    token: &[u8],
    fsync: bool,
    checksum_cache: bool,
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
    let agent = super::agent::with_write_log(agent, root, None)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(agent.serve(listener)?)
}
