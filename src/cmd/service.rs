//! What `agent` and `server` do as services: a clean stop on SIGTERM or SIGINT
//! (`signal-hook`), and readiness for systemd's `Type=notify` (`sd-notify`: `READY=1` once
//! listening, `STOPPING=1` when stopping; nothing without `NOTIFY_SOCKET`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Set once SIGTERM or SIGINT arrived; a second one ends the process at once (exit 1).
#[derive(Clone)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    name: Arc<OnceLock<&'static str>>,
}

impl StopSignal {
    /// Starts listening for SIGTERM and SIGINT (on a thread of its own).
    pub fn install() -> anyhow::Result<StopSignal> {
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .context("installing the SIGTERM/SIGINT handlers")?;
        let stop = StopSignal {
            flag: Arc::new(AtomicBool::new(false)),
            name: Arc::new(OnceLock::new()),
        };
        let s = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    if s.name.set(name).is_err() {
                        eprintln!("fleetsync: {name} again: stopping at once");
                        std::process::exit(1);
                    }
                    s.flag.store(true, Ordering::SeqCst);
                }
            })
            .context("starting the signal thread")?;
        Ok(stop)
    }

    /// The flag the signal sets.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Blocks until a stop signal arrives; its name.
    pub fn wait(&self) -> &'static str {
        while !self.flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.name()
    }

    /// The signal that arrived ("" if none).
    pub fn name(&self) -> &'static str {
        self.name.get().copied().unwrap_or("")
    }
}

/// Tells systemd (`Type=notify`) the service is ready: call once listening on `addr`.
pub fn notify_ready(addr: &str) {
    let status = format!("listening on {addr}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping"),
    ]);
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Keeps NOTIFY_SOCKET set (false): STOPPING=1 goes there later.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
