//! fleetsync server.
#![deny(missing_docs)]
