//! The fleetsync comparison server: diffs a master file list against each
//! remote's and orders the agents to make the remotes identical.
//!
//! - [`list`]: [`list::FileList`], the compact sorted file list;
//! - [`plan`]: [`plan::PairPlan`], the pure diff planner of one master/remote pair;
//! - [`basis`]: [`basis::BasisIndex`], the choice of a delta basis for a new file;
//! - [`blocks`]: [`blocks::BlocksFile`], the dependency blocks file (`--blocks`);
//! - [`jobs`]: [`jobs::JobStore`], the job history database;
//! - the event loop ([`Server`]) runs one `SyncJob` per request, of one `RemoteSync`
//!   state machine per master/remote pair.
#![deny(missing_docs)]

pub mod basis;
pub mod blocks;
mod checksums;
mod conn;
mod event_loop;
pub mod jobs;
pub mod list;
pub mod metrics;
mod ops;
pub mod plan;
mod relay;
pub mod remote_list;
mod remote_sync;
mod sync_job;

pub use event_loop::{Server, ServerConfig, ServerTls};
