//! Logging of the long-running and networked subcommands (`agent`, `server`,
//! `sync`, `verify`): `tracing` on stderr, as text or JSON lines (`--log-format`).

use std::io::IsTerminal;

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// other fields, for log shippers.
    Json,
}

/// The `--log-format` flag (flattened into a subcommand's `Args`).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct LogArgs {
    /// Log line format on stderr: text, or json (one object per line with timestamp, level,
    /// target, message and the event's fields).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Sets up `tracing` on stderr: warnings by default, `-v` info, `-vv` debug;
/// `RUST_LOG` overrides. Colours only when stderr is a terminal, so that a log
/// redirected to a file or a journal carries no ANSI escapes.
pub fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}
