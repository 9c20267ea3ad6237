//! Where `sum` writes: results to a buffered stdout, diagnostics to stderr,
//! in the order they happen; and engine errors in coreutils' words.

use std::io::{self, Write};

use fleetsync_engine::Error;

use super::format::os_message;

/// Writes results to a buffered stdout and diagnostics to stderr, keeping their order.
pub(crate) struct Reporter {
    out: io::BufWriter<io::Stdout>,
}

impl Reporter {
    pub(crate) fn new() -> Self {
        Reporter {
            out: io::BufWriter::with_capacity(64 << 10, io::stdout()),
        }
    }

    /// Appends bytes to standard output.
    pub(crate) fn out(&mut self, bytes: &[u8]) {
        if let Err(e) = self.out.write_all(bytes) {
            broken_pipe_exit(&e);
        }
    }

    /// Prints `fleetsync: MSG` on standard error, after what stdout holds so far.
    pub(crate) fn error(&mut self, msg: &str) {
        self.flush();
        eprintln!("fleetsync: {msg}");
    }

    pub(crate) fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            broken_pipe_exit(&e);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

fn broken_pipe_exit(e: &io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
}

/// An engine error as a diagnostic: the OS reason alone for I/O errors
/// (the caller names the file), else the engine's own message.
pub(crate) fn engine_error_message(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => os_message(source),
        other => other.to_string(),
    }
}
