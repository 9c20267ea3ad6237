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
#![deny(missing_docs)]

pub mod backend;
mod error;
pub mod path;
mod server;
pub mod sumcache;
mod transfer;

pub use backend::{Backend, PosixBackend, TempFile};
pub use error::AgentError;
pub use server::{Agent, AgentHandle};
pub mod consistency;
pub mod journal;
pub mod lock;
