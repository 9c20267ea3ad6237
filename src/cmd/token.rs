//! The shared-token options of every command that talks to agents or a
//! server: `agent`, `server`, and `sync`/`verify` with `--server`.

use std::path::PathBuf;

use anyhow::{bail, Context};

/// Where the shared token comes from: `--token-file`, else the
/// `FLEETSYNC_TOKEN` environment variable.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TokenArgs {
    /// File holding the shared token (trailing whitespace ignored; default: $FLEETSYNC_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Go without authentication when there is no token (anyone who can connect is trusted).
    #[arg(long)]
    pub insecure_no_auth: bool,
}

impl TokenArgs {
    /// The token; `None` only when there is none and `--insecure-no-auth`
    /// says that is intended. Without either, an error naming both ways.
    pub fn load(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let token = load_token(self.token_file.as_ref())?;
        if token.is_none() && !self.insecure_no_auth {
            bail!("no token: use --token-file FILE or set FLEETSYNC_TOKEN (or --insecure-no-auth)");
        }
        Ok(token)
    }
}

/// Reads the token from `file`, else from `FLEETSYNC_TOKEN`; trailing
/// whitespace is dropped, and an empty token is an error.
fn load_token(file: Option<&PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    let raw = match file {
        Some(f) => {
            Some(std::fs::read(f).with_context(|| format!("reading token file {}", f.display()))?)
        }
        None => std::env::var_os("FLEETSYNC_TOKEN").map(|v| {
            use std::os::unix::ffi::OsStringExt;
            v.into_vec()
        }),
    };
    match raw {
        None => Ok(None),
        Some(mut t) => {
            while t.last().is_some_and(|b| b.is_ascii_whitespace()) {
                t.pop();
            }
            if t.is_empty() {
                bail!("the token is empty");
            }
            Ok(Some(t))
        }
    }
}
