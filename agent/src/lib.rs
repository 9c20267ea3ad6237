//! fleetsync agent: serves one tree to a fleetsync server — lists it,
//! checksums files where they live, streams files to another agent, and
//! applies received files and orders atomically.
//!
//! ```no_run
//! use std::net::TcpListener;
//! use fleetsync_agent::Agent;
//!
//! // `None`: the default POSIX backend on the root.
//! let agent = Agent::new("/srv/tree", Some(b"token".to_vec()), None).unwrap();
//! let handle = agent.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
//! println!("listening on {}", handle.local_addr());
//! handle.stop();
//! ```
//!
//! What the agent guarantees:
//! - **Authentication**: every connection starts with an HMAC-SHA256
//!   challenge-response on the shared token (`fleetsync_proto::auth`); a peer
//!   that fails gets its connection closed and nothing else.
//! - **Paths stay beneath the root**: every path from a message is checked
//!   ([`path::check`]) and resolved with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS)`; the last component is handled with `*at` calls
//!   that do not follow symlinks.
//! - **Old or new, never torn**: received files go to `.fleetsync.tmp.*`
//!   beside their destination, are verified (size and checksum), fsynced and
//!   renamed; symlinks and hard links are made under a temp name and renamed
//!   over. Leftovers of a killed agent are removed by the next listing. A
//!   transfer cut mid-file can keep what arrived as a hidden partial
//!   (`.fleetsync.partial.<name>`, see [`backend::PARTIAL_PREFIX`]) that the next
//!   sync resumes; partials are never listed and are removed once stale.
//! - **Checksums where the data lives**, through `fleetsync_engine`, with a
//!   ctime-keyed cache ([`sumcache`]) so an unchanged tree is not read again.
//! - **Self-checks after a sync**: every received file is recorded (size, mtime,
//!   inode, digest) in memory and in a write log outside the tree
//!   ([`Agent::with_write_log`]); a `consistencyRequest` runs the checks
//!   ([`consistency::RecordedStateCheck`], plus a deployment's own added with
//!   [`Agent::with_check`]) and names the files that changed since.
#![deny(missing_docs)]

mod ahead;
mod apply;
pub mod backend;
mod bases;
mod blocks;
mod check;
mod checksum;
// The stream code wires it in next (issue 11); until then only its tests use it.
#[allow(dead_code)]
mod codec;
pub mod consistency;
mod error;
mod forward;
pub mod journal;
mod list;
mod listen;
pub mod lock;
pub mod metrics;
mod outgoing;
pub mod path;
mod ratelimit;
mod receive;
mod records;
mod send;
mod session;
mod stages;
pub mod sumcache;
pub mod versions;

pub use backend::{Backend, FinishedStat, FinishedTemp, PosixBackend, TempFile};
pub use error::AgentError;
pub use listen::{Agent, AgentHandle, StopReport};

/// How file data travels between agents: the values of `--compress` and of the bandwidth
/// limits, as the command line and configuration give them.
pub mod transfer {
    pub use crate::codec::chunk::Compression;
    pub use crate::ratelimit::parse_rate;
}
pub use versions::VersionStore;
