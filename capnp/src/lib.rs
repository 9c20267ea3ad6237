//! fleetsync wire protocol.
#![deny(missing_docs)]
