//! fleetsync agent.
#![deny(missing_docs)]
