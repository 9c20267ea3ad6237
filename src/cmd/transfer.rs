//! How file data travels: `--compress`, `--bwlimit`, `--master-bwlimit`, `--no-delta`.

use clap::Args;
use fleetsync_agent::transfer::{parse_rate, Compression};
use fleetsync_proto::TransferOptions;

/// Transfer flags of `sync`.
#[derive(Args, Debug, Clone)]
pub struct TransferArgs {
    /// Compress file data on the wire: auto (zstd when the link is the bottleneck, its level
    /// adapted to the link; never on a link faster than compressing), off, zstd, zstd:LEVEL
    /// (1-19). Incompressible data is always sent as is.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub compress: String,
    /// Limit each remote's stream to RATE (e.g. 10mbit, 50M = 50 MB/s, 2MiB; see --help).
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
    /// Limit all streams leaving the master together to RATE.
    #[arg(long, value_name = "RATE")]
    pub master_bwlimit: Option<String>,
    /// Send changed files whole (compressed), never as deltas against the remote's copy (an
    /// interrupted transfer still resumes from its partial file).
    #[arg(long)]
    pub no_delta: bool,
}

impl TransferArgs {
    /// The options as a sync request carries them; a bad value is an error naming its flag.
    pub fn options(&self) -> anyhow::Result<TransferOptions> {
        self.compress
            .parse::<Compression>()
            .map_err(|e| anyhow::anyhow!("--compress: {e}"))?;
        let rate = |flag: &str, v: &Option<String>| -> anyhow::Result<u64> {
            match v {
                None => Ok(0),
                Some(v) => match parse_rate(v) {
                    Ok(0) => {
                        anyhow::bail!("{flag}: '{v}' is zero; leave the flag out for no limit")
                    }
                    Ok(r) => Ok(r),
                    Err(e) => anyhow::bail!("{flag}: {e}"),
                },
            }
        };
        Ok(TransferOptions {
            compress: self.compress.clone(),
            bwlimit: rate("--bwlimit", &self.bwlimit)?,
            master_bwlimit: rate("--master-bwlimit", &self.master_bwlimit)?,
            no_delta: self.no_delta,
        })
    }
}
