//! The shared-token options of every command that talks to agents or a
//! server: `agent`, `server`, and `sync`/`verify` with `--server`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the shared token comes from: `--token-file`, else the
/// `FLEETSYNC_TOKEN` environment variable.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TokenArgs {
    /// File holding the shared token: at least 16 bytes, mode 600 (trailing whitespace ignored;
    /// default: $FLEETSYNC_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Go without authentication when there is no token (anyone who can connect is trusted).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// TLS 1.3 with certificates of the fleet CA on every connection: DIR holds ca.pem,
    /// cert.pem and key.pem (`fleetsync cert issue ... --out DIR`). With --tls a token is
    /// optional; given as well, it is checked too, inside TLS.
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,
}

impl TokenArgs {
    /// The token; `None` only when there is none and `--insecure-no-auth`
    /// says that is intended. Without either, an error naming both ways.
    pub fn load(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let token = load_token(self.token_file.as_ref())?;
        if token.is_none() && !self.insecure_no_auth && self.tls.is_none() {
            bail!(
                "no token: use --tls DIR (certificates), --token-file FILE or set \
                 FLEETSYNC_TOKEN (or --insecure-no-auth)"
            );
        }
        Ok(token)
    }

    /// Our TLS identity (`--tls DIR`), if TLS is on.
    pub fn load_tls(&self) -> anyhow::Result<Option<fleetsync_proto::tls::Identity>> {
        match &self.tls {
            None => Ok(None),
            Some(dir) => fleetsync_proto::tls::Identity::load(dir)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--tls {}: {e}", dir.display())),
        }
    }
}

/// The shortest token accepted, in bytes (after trailing whitespace is dropped): shorter ones
/// are guessable (`HMAC` does not make a short secret strong).
pub const MIN_TOKEN_LEN: usize = 16;

/// Reads the token from `file`, else from `FLEETSYNC_TOKEN`; trailing
/// whitespace is dropped. An empty token, or one shorter than [`MIN_TOKEN_LEN`], is an
/// error naming where it came from; a token file that its group or others may read gets a
/// warning on stderr.
fn load_token(file: Option<&PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    let (raw, source) = match file {
        Some(f) => {
            let raw =
                std::fs::read(f).with_context(|| format!("reading token file {}", f.display()))?;
            warn_if_readable_by_others(f);
            (Some(raw), format!("token file {}", f.display()))
        }
        None => (
            std::env::var_os("FLEETSYNC_TOKEN").map(|v| {
                use std::os::unix::ffi::OsStringExt;
                v.into_vec()
            }),
            "FLEETSYNC_TOKEN".to_owned(),
        ),
    };
    match raw {
        None => Ok(None),
        Some(mut t) => {
            while t.last().is_some_and(|b| b.is_ascii_whitespace()) {
                t.pop();
            }
            if t.is_empty() {
                bail!("the token is empty ({source})");
            }
            if t.len() < MIN_TOKEN_LEN {
                bail!(
                    "the token in {source} is {} bytes long, too short to be safe: use at least \
                     {MIN_TOKEN_LEN} random bytes (e.g. `head -c 32 /dev/urandom | base64`)",
                    t.len()
                );
            }
            Ok(Some(t))
        }
    }
}

/// Warns on stderr when the group or others may read (or write) the token file `f`.
fn warn_if_readable_by_others(f: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(f) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        eprintln!(
            "fleetsync: warning: the token file {} is accessible to its group or others \
             (mode {mode:04o}): anyone who reads it can join the fleet; run `chmod 600 {}`",
            f.display(),
            f.display()
        );
    }
}
