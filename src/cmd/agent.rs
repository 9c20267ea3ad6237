//! `fleetsync agent`.

/// Arguments of `fleetsync agent`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `fleetsync agent`; returns the process exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("'agent' is not built yet")
}
