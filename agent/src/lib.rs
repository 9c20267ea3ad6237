//! fleetsync agent.
#![deny(missing_docs)]
pub mod journal;
