//! Logging of the long-running and networked subcommands (`agent`, `server`,
//! `sync`, `verify`): `tracing` on stderr.

use std::io::IsTerminal;

/// Sets up `tracing` on stderr: warnings by default, `-v` info, `-vv` debug;
/// `RUST_LOG` overrides. Colours only when stderr is a terminal, so that a log
/// redirected to a file or a journal carries no ANSI escapes.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
