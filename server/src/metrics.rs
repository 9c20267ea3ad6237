//! What the server counts for `--metrics-listen` (Prometheus text exposition, rendered with
//! the `prometheus-client` crate): jobs, and per remote the files and bytes sent, bytes on
//! the wire, deletions, fixes, consistency rounds and failures; connected agents.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::jobs::RemoteCounts;

/// The label of the per-remote counters: the remote's name in the job history (its
/// `--job-label`, else its address).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabel {
    remote: String,
}

/// The label of finished jobs: `succeeded` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// The server's counters, shared with the thread that serves them.
pub struct ServerMetrics {
    registry: Registry,
    jobs_started: Counter,
    jobs_finished: Family<StatusLabel, Counter>,
    jobs_running: Gauge,
    files_sent: Family<RemoteLabel, Counter>,
    bytes_sent: Family<RemoteLabel, Counter>,
    wire_bytes: Family<RemoteLabel, Counter>,
    files_deleted: Family<RemoteLabel, Counter>,
    fixes: Family<RemoteLabel, Counter>,
    consistency_rounds: Family<RemoteLabel, Counter>,
    remote_failures: Family<RemoteLabel, Counter>,
    agents_connected: Gauge,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fleetsync_server");
        let r = &mut registry;
        ServerMetrics {
            jobs_started: add(r, "jobs_started", "Sync jobs started"),
            jobs_finished: add(r, "jobs_finished", "Sync jobs finished, by status"),
            jobs_running: add(r, "jobs_running", "Sync jobs running now"),
            files_sent: add(r, "files_sent", "Files sent to a remote"),
            bytes_sent: add(r, "bytes_sent", "Bytes of the files sent to a remote"),
            wire_bytes: add(
                r,
                "wire_bytes",
                "Bytes of file data on the wire to a remote (after compression and deltas)",
            ),
            files_deleted: add(r, "files_deleted", "Entries deleted on a remote"),
            fixes: add(r, "fixes", "Attribute and link fixes on a remote"),
            consistency_rounds: add(r, "consistency_rounds", "Consistency rounds on a remote"),
            remote_failures: add(r, "remote_failures", "Syncs of a remote that ended failed"),
            agents_connected: add(r, "agents_connected", "Agent connections open now"),
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

impl ServerMetrics {
    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub(crate) fn job_started(&self) {
        self.jobs_started.inc();
        self.jobs_running.inc();
    }

    pub(crate) fn job_finished(&self, ok: bool) {
        let status = if ok { "succeeded" } else { "failed" };
        self.jobs_finished
            .get_or_create(&StatusLabel { status })
            .inc();
        self.jobs_running.dec();
    }

    /// What a remote did since `before` (its counts then): added to its counters.
    pub(crate) fn progress(&self, remote: &str, before: &RemoteCounts, now: &RemoteCounts) {
        let l = RemoteLabel {
            remote: remote.to_owned(),
        };
        let add = |f: &Family<RemoteLabel, Counter>, a: u64, b: u64| {
            if b > a {
                f.get_or_create(&l).inc_by(b - a);
            }
        };
        add(&self.files_sent, before.sent, now.sent);
        add(&self.bytes_sent, before.bytes, now.bytes);
        add(&self.wire_bytes, before.wire_bytes, now.wire_bytes);
        add(&self.files_deleted, before.deleted, now.deleted);
        add(&self.fixes, before.fixed, now.fixed);
        add(
            &self.consistency_rounds,
            before.rounds.into(),
            now.rounds.into(),
        );
    }

    pub(crate) fn remote_failed(&self, remote: &str) {
        self.remote_failures
            .get_or_create(&RemoteLabel {
                remote: remote.to_owned(),
            })
            .inc();
    }

    pub(crate) fn agent_connected(&self) {
        self.agents_connected.inc();
    }

    pub(crate) fn agent_disconnected(&self) {
        self.agents_connected.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_remote_counts_are_labelled_and_only_grow() {
        let m = ServerMetrics::default();
        m.job_started();
        let zero = RemoteCounts::default();
        let mid = RemoteCounts {
            sent: 3,
            bytes: 300,
            ..zero
        };
        let end = RemoteCounts {
            sent: 5,
            bytes: 500,
            wire_bytes: 120,
            ..zero
        };
        m.progress("r1", &zero, &mid);
        m.progress("r1", &mid, &end);
        m.job_finished(true);
        let text = m.render();
        assert!(
            text.contains("fleetsync_server_files_sent_total{remote=\"r1\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetsync_server_wire_bytes_total{remote=\"r1\"} 120\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetsync_server_jobs_finished_total{status=\"succeeded\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("fleetsync_server_jobs_running 0\n"), "{text}");
    }
}
