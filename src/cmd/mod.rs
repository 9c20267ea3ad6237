//! One module per subcommand; each has `Args` (clap) and `run` returning the exit code.

pub mod agent;
pub mod bench;
pub mod jobs;
pub mod jsonpath;
pub mod selection;
pub mod server;
pub mod sum;
pub mod sync;
pub mod token;
pub mod verify;
