//! One module per subcommand; each has `Args` (clap) and `run` returning the exit code.
//! Beside them, what several subcommands share: `target` (how `sync`/`verify` reach the
//! trees), `selection` (which entries), `embedded` (the in-process fleet), `control` (the
//! control client), `itemize` (plan items as lines),
//! `hashargs` (the `sum`/`bench` options), `jsonpath`, `token` (token and `--tls`), `logging`;
//! `config` (`--config`/`--print-config`) and `service` (signals, systemd readiness) of `agent`
//! and `server`; `cert` (the fleet CA).

pub mod agent;
pub mod bench;
pub mod cert;
pub mod completions;
pub mod config;
pub mod control;
pub mod embedded;
pub mod hashargs;
pub mod itemize;
pub mod jobs;
pub mod jsonpath;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod selection;
pub mod server;
pub mod service;
pub mod sum;
pub mod sync;
pub mod target;
pub mod token;
pub mod transfer;
pub mod verify;
