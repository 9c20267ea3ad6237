//! How `sync` and `verify` reach the trees: through a running server
//! (`--server`, `--master`), or an embedded fleet over directories; and the
//! checksum that compares files (`-a`).

use std::path::PathBuf;

use anyhow::bail;
use fleetsync_proto::SyncRequest;

use super::control::{self, Display, SyncReply};
use super::embedded::{EmbeddedFleet, FleetOptions};
use super::token::TokenArgs;

/// How the trees are reached, and which checksum compares files.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// Address of a running `fleetsync server`.
    #[arg(long, value_name = "ADDR", requires = "master")]
    pub server: Option<String>,
    /// The master agent (host:port), with --server.
    #[arg(long, value_name = "AGENT", requires = "server")]
    pub master: Option<String>,
    /// Checksum algorithm (any `fleetsync sum --list` name).
    #[arg(
        short = 'a',
        long = "algorithm",
        value_name = "ALG",
        default_value = "crc32"
    )]
    pub algorithm: String,
}

/// The trees of one `sync` or `verify` command line: PATHS and how they are reached.
pub struct Trees<'a> {
    /// The subcommand, for the usage error.
    pub command: &'static str,
    /// MASTER_DIR REMOTE_DIR... (embedded) or REMOTE_AGENT... (with --server).
    pub paths: &'a [PathBuf],
    /// The token, with --server.
    pub auth: &'a TokenArgs,
    /// The embedded fleet, without --server.
    pub fleet: FleetOptions,
}

impl Target {
    /// An error naming the algorithm when the engine does not know it.
    pub fn check_algorithm(&self) -> anyhow::Result<()> {
        if fleetsync_engine::Registry::with_builtins()
            .info(&self.algorithm)
            .is_err()
        {
            bail!("unknown checksum algorithm '{}'", self.algorithm);
        }
        Ok(())
    }

    /// Sends the request `request` makes (its master, remotes and algorithm are set here)
    /// to the server, or to an embedded fleet started over `trees.paths` and stopped after;
    /// returns the reply and the remotes' labels (their agent addresses or directories).
    /// `request` is called once the trees are reached, so that its errors come after theirs.
    pub fn send(
        &self,
        trees: Trees<'_>,
        request: impl FnOnce() -> anyhow::Result<SyncRequest>,
        display: Display,
    ) -> anyhow::Result<(SyncReply, Vec<String>)> {
        let paths = trees.paths;
        let addressed = |master: String, remotes: Vec<String>| -> anyhow::Result<SyncRequest> {
            Ok(SyncRequest {
                master,
                remotes,
                algorithm: self.algorithm.clone(),
                ..request()?
            })
        };
        match (&self.server, &self.master) {
            (Some(server), Some(master)) => {
                if paths.is_empty() {
                    bail!("name at least one remote agent");
                }
                let token = trees.auth.load()?;
                let remotes: Vec<String> = paths
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                let req = addressed(master.clone(), remotes.clone())?;
                let reply = control::send(server, token.as_deref(), req, display, &remotes)?;
                Ok((reply, remotes))
            }
            _ => {
                if paths.len() < 2 {
                    bail!(
                        "usage: fleetsync {} MASTER_DIR REMOTE_DIR... (or --server ADDR --master AGENT REMOTE...)",
                        trees.command
                    );
                }
                let fleet = EmbeddedFleet::start(paths, trees.fleet)?;
                let labels: Vec<String> =
                    paths[1..].iter().map(|p| p.display().to_string()).collect();
                let req = addressed(fleet.master(), fleet.remotes())?;
                let reply = control::send(
                    &fleet.server_addr(),
                    Some(fleet.token()),
                    req,
                    display,
                    &labels,
                );
                drop(fleet);
                Ok((reply?, labels))
            }
        }
    }
}
