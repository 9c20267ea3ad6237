//! The coding layer of the agent-to-agent file stream (issue 11): pure transformations of
//! bytes, no sockets and no files of the tree. The stream code decides what to use per file.
//!
//! - [`chunk`]: each `fileChunk` as one independent zstd frame, with incompressible data sent
//!   as is and, in `auto` mode, a level adapted to where the time goes (link or CPU).
//! - [`patch`]: the sender holds the old and the new version: one zstd frame with the old
//!   version as reference prefix and long-distance matching (as `zstd --patch-from`).
//! - [`delta`]: only the remote holds the old version: rsync-style block signatures from the
//!   remote, copy/literal instructions from the sender, applied as they stream in.

pub(crate) mod chunk;
pub(crate) mod delta;
pub(crate) mod patch;

#[cfg(test)]
mod tests;
