//! `fleetsync sum`.

/// Arguments of `fleetsync sum`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `fleetsync sum`; returns the process exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("'sum' is not built yet")
}
