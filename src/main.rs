//! `fleetsync`: keep many file trees identical to one master tree, and the
//! checksum tools that power it.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod cmd;

/// Keep large file trees on many machines identical to one master tree.
#[derive(Parser)]
#[command(name = "fleetsync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print or check checksums (drop-in for cksum, sum, md5sum, sha*sum).
    Sum(cmd::sum::Args),
    /// Compare checksum algorithms on a synthetic or real workload.
    Bench(cmd::bench::Args),
    /// Synchronize remote trees to a master tree.
    Sync(cmd::sync::Args),
    /// Serve one tree to a fleetsync server.
    Agent(cmd::agent::Args),
    /// Run the comparison server.
    Server(cmd::server::Args),
    /// List the server's job history, or show one job.
    Jobs(cmd::jobs::Args),
    /// Report how the remote trees differ from the master, changing nothing.
    Verify(cmd::verify::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cmd::completions::Args),
    /// Write the man pages (fleetsync.1, fleetsync-SUBCOMMAND.1) into a directory.
    Man(cmd::man::Args),
    /// Make the fleet CA and issue certificates (TLS).
    Cert(cmd::cert::Args),
}

fn main() -> ExitCode {
    // `agent` and `server` take their settings from `--config FILE` too (see cmd::config).
    let cli = match cmd::config::parse(Cli::command()) {
        Ok(cmd::config::Parsed::Run(m)) => Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit()),
        Ok(cmd::config::Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("fleetsync: {err:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Sum(args) => cmd::sum::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Sync(args) => cmd::sync::run(args),
        Command::Agent(args) => cmd::agent::run(args),
        Command::Server(args) => cmd::server::run(args),
        Command::Jobs(args) => cmd::jobs::run(args),
        Command::Verify(args) => cmd::verify::run(args),
        Command::Completions(args) => cmd::completions::run(args, Cli::command()),
        Command::Man(args) => cmd::man::run(args, Cli::command()),
        Command::Cert(args) => cmd::cert::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("fleetsync: {err:#}");
            ExitCode::from(2)
        }
    }
}
