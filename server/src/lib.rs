//! fleetsync server.
#![deny(missing_docs)]
pub mod blocks;
pub mod jobs;
