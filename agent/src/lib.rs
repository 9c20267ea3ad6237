//! fleetsync agent.
#![deny(missing_docs)]
pub mod consistency;
pub mod journal;
pub mod lock;
