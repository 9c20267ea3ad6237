//! fleetsync agent.
#![deny(missing_docs)]
pub mod journal;
pub mod lock;
