//! `fleetsync bench`.

/// Arguments of `fleetsync bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `fleetsync bench`; returns the process exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("'bench' is not built yet")
}
