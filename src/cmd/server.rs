//! `fleetsync server`.

/// Arguments of `fleetsync server`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `fleetsync server`; returns the process exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("'server' is not built yet")
}
