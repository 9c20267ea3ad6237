//! How `sync` and `verify` reach the trees: through a running server
//! (`--server`, `--master`), or an embedded fleet over directories; and the
//! checksum that compares files (`-a`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use fleetsync_proto::{Action, PlanItem, SyncRequest};

use super::control::{self, Display, SyncReply};
use super::embedded::{EmbeddedFleet, FleetDirs, FleetOptions};
use super::itemize::item_line;
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
    /// An error naming the algorithm when the engine does not know it, with the same
    /// `--list` hint as `sum -a` (`sync` has no `--list` of its own: it points to `sum`'s).
    pub fn check_algorithm(&self) -> anyhow::Result<()> {
        if fleetsync_engine::Registry::with_builtins()
            .info(&self.algorithm)
            .is_err()
        {
            bail!(
                "unknown checksum algorithm '{}' (see fleetsync sum --list)",
                self.algorithm
            );
        }
        Ok(())
    }

    /// Sends the request `request` makes (its master, remotes and algorithm are set here)
    /// to the server, or to an embedded fleet started over `trees.paths` and stopped after;
    /// returns the reply and the remotes' labels (their agent addresses or directories).
    /// `request` is called once the trees are reached, so that its errors come after theirs.
    ///
    /// Embedded, a remote directory that did not exist gets a `mkdir` item for its root
    /// (path `""`), shown first: printed when `display` itemizes, else first in the reply's
    /// items. With --server the paths are agents' addresses and are not checked here.
    pub fn send(
        &self,
        trees: Trees<'_>,
        request: impl FnOnce() -> anyhow::Result<SyncRequest>,
        display: Display,
    ) -> anyhow::Result<(SyncReply, Vec<String>)> {
        let paths = trees.paths;
        let addressed = |master: String, remotes: Vec<String>, base: SyncRequest| SyncRequest {
            master,
            remotes,
            algorithm: self.algorithm.clone(),
            ..base
        };
        match (&self.server, &self.master) {
            (Some(server), Some(master)) => {
                if paths.is_empty() {
                    bail!("name at least one remote agent");
                }
                let token = trees.auth.load()?;
                let tls = trees.auth.load_tls()?;
                let remotes: Vec<String> = paths
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                let req = addressed(master.clone(), remotes.clone(), request()?);
                let reply = control::send(
                    server,
                    token.as_deref(),
                    tls.as_ref(),
                    req,
                    display,
                    &remotes,
                )?;
                Ok((reply, remotes))
            }
            _ => {
                if paths.len() < 2 {
                    bail!(
                        "usage: fleetsync {} MASTER_DIR REMOTE_DIR... (or --server ADDR --master AGENT REMOTE...)",
                        trees.command
                    );
                }
                // Nothing is created or started before the trees and the request are found
                // sound.
                let dirs = FleetDirs::find(paths)?;
                let base = request()?;
                let fleet = EmbeddedFleet::start(dirs, trees.fleet)?;
                let labels: Vec<String> =
                    paths[1..].iter().map(|p| p.display().to_string()).collect();
                let roots = missing_root_items(&fleet, &labels, trees.command, trees.fleet);
                let req = addressed(fleet.master(), fleet.remotes(), base);
                if let Display::Print { itemize: true, .. } = display {
                    let mut out = std::io::stdout().lock();
                    for item in &roots {
                        let label =
                            (labels.len() > 1).then(|| labels[item.remote as usize].as_str());
                        writeln!(out, "{}", item_line(item, label))?;
                    }
                }
                let reply = control::send(
                    &fleet.server_addr(),
                    Some(fleet.token()),
                    None,
                    req,
                    display,
                    &labels,
                );
                drop(fleet);
                let mut reply = reply?;
                if let Display::Collect = display {
                    reply.items.splice(0..0, roots);
                }
                Ok((reply, labels))
            }
        }
    }
}

/// A `mkdir` item for the root of each remote whose directory did not exist: created (a
/// sync), to be created (a dry run), or missing (verify).
fn missing_root_items(
    fleet: &EmbeddedFleet,
    labels: &[String],
    command: &str,
    options: FleetOptions,
) -> Vec<PlanItem> {
    fleet
        .missing_remotes()
        .iter()
        .zip(labels)
        .enumerate()
        .filter(|(_, (missing, _))| **missing)
        .map(|(i, (_, label))| PlanItem {
            remote: i as u32,
            path: Vec::new(),
            action: Action::Mkdir,
            size: 0,
            detail: if options.create_missing {
                format!("remote root {label} created")
            } else if command == "sync" {
                format!("remote root {label} does not exist; a sync creates it")
            } else {
                format!("remote root {label} does not exist")
            },
        })
        .collect()
}
