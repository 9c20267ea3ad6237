//! What an agent counts for `--metrics-listen` (Prometheus text exposition, rendered with the
//! `prometheus-client` crate): files and bytes received and sent, bytes on the wire, checksum
//! work, failed items, connections.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fleetsync_proto::{ItemResult, Outcome};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// An agent's counters, shared by all its connections.
pub struct AgentMetrics {
    registry: Registry,
    files_received: Counter,
    bytes_received: Counter,
    wire_bytes_received: Counter,
    files_sent: Counter,
    bytes_sent: Counter,
    wire_bytes_sent: Counter,
    checksums: Counter,
    checksum_seconds: Counter<f64, AtomicU64>,
    failed_items: Counter,
    connections: Gauge,
    connections_accepted: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleetsync_agent");
        let r = &mut registry;
        AgentMetrics {
            files_received: add(r, "files_received", "Files written into this tree"),
            bytes_received: add(r, "bytes_received", "Bytes of the files written into this tree"),
            wire_bytes_received: add(
                r,
                "wire_bytes_received",
                "Bytes of file data that arrived on the wire for them (after compression and deltas)",
            ),
            files_sent: add(r, "files_sent", "Files this agent sent to other agents"),
            bytes_sent: add(r, "bytes_sent", "Bytes of the files this agent sent"),
            wire_bytes_sent: add(r, "wire_bytes_sent", "Bytes of file data put on the wire"),
            checksums: add(r, "checksums", "File checksums computed or taken from the cache"),
            checksum_seconds: add(r, "checksum_seconds", "Time spent answering checksum requests"),
            failed_items: add(r, "failed_items", "Files that failed here"),
            connections: add(r, "connections", "Connections open now"),
            connections_accepted: add(
                r,
                "connections_accepted",
                "Connections authenticated since the start",
            ),
            registry,
        }
    }
}

/// A new metric, registered under `name`.
fn add<M: prometheus_client::registry::Metric + Clone + Default>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

impl AgentMetrics {
    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// A received file's result (written and verified, or failed).
    pub(crate) fn received(&self, r: &ItemResult) {
        match r.outcome {
            Outcome::Ok => {
                self.files_received.inc();
                self.bytes_received.inc_by(r.bytes);
                self.wire_bytes_received.inc_by(r.wire_bytes);
            }
            Outcome::Failed => {
                self.failed_items.inc();
            }
            Outcome::Skipped => {}
        }
    }

    /// A file sent: its bytes, and the bytes of file data it took on the wire.
    pub(crate) fn sent(&self, bytes: u64, wire_bytes: u64) {
        self.files_sent.inc();
        self.bytes_sent.inc_by(bytes);
        self.wire_bytes_sent.inc_by(wire_bytes);
    }

    /// A checksum request answered: `files` checksums in `took`.
    pub(crate) fn checksummed(&self, files: u64, took: Duration) {
        self.checksums.inc_by(files);
        self.checksum_seconds.inc_by(took.as_secs_f64());
    }

    /// Items that failed here (other than received files).
    pub(crate) fn failed(&self, n: u64) {
        self.failed_items.inc_by(n);
    }

    /// A connection authenticated; the guard counts it open until dropped.
    pub(crate) fn connection(&self) -> ConnectionGuard<'_> {
        self.connections_accepted.inc();
        self.connections.inc();
        ConnectionGuard(self)
    }
}

/// Counts one connection open while it lives.
pub(crate) struct ConnectionGuard<'a>(&'a AgentMetrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_appear_in_the_exposition_with_help_and_type() {
        let m = AgentMetrics::default();
        m.received(&ItemResult {
            path: b"a".to_vec(),
            outcome: Outcome::Ok,
            message: String::new(),
            bytes: 100,
            digest: Vec::new(),
            wire_bytes: 40,
            coding: String::new(),
        });
        m.sent(7, 3);
        let g = m.connection();
        let text = m.render();
        assert!(
            text.contains("# TYPE fleetsync_agent_files_received counter"),
            "{text}"
        );
        assert!(
            text.contains("fleetsync_agent_files_received_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetsync_agent_bytes_received_total 100\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetsync_agent_wire_bytes_sent_total 3\n"),
            "{text}"
        );
        assert!(text.contains("fleetsync_agent_connections 1\n"), "{text}");
        drop(g);
        assert!(m.render().contains("fleetsync_agent_connections 0\n"));
        assert!(m.render().ends_with("# EOF\n"));
    }
}
