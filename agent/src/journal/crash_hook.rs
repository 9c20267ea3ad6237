//! The fault-injection hook of commit and recovery (see [`CRASH_AT_ENV`]).

use super::*;

/// The fault-injection counter (see the module docs).
pub(super) struct CrashHook {
    at: Option<u64>,
    count: u64,
}

impl CrashHook {
    pub(super) fn from_env() -> Self {
        let at = std::env::var(CRASH_AT_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Self { at, count: 0 }
    }

    pub(super) fn step(&mut self) {
        self.count += 1;
        if self.at == Some(self.count) {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort();
        }
    }
}
