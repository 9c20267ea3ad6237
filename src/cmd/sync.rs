//! `fleetsync sync`.

/// Arguments of `fleetsync sync`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `fleetsync sync`; returns the process exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("'sync' is not built yet")
}
