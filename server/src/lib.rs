//! The fleetsync comparison server: diffs a master file list against each
//! remote's and orders the agents to make the remotes identical.
//!
//! - [`list`]: [`list::FileList`], the compact sorted file list;
//! - [`plan`]: [`plan::PairPlan`], the pure diff planner of one master/remote pair.
#![deny(missing_docs)]

pub mod list;
pub mod plan;
pub mod server;

pub use server::{Server, ServerConfig};
pub mod blocks;
pub mod jobs;
