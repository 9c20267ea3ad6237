//! The bench report as a text table, JSON, or an SVG bar chart.

use std::fmt::Write as _;

use super::compare::Comparison;
use super::workload::Workload;

/// The timing of one algorithm.
pub(crate) struct Measurement {
    pub algorithm: String,
    pub seconds: f64,
}

/// Everything `fleetsync bench` found.
pub(crate) struct Report<'a> {
    pub workload: &'a Workload,
    pub results: &'a [Measurement],
    pub comparisons: &'a [Comparison],
    pub threads: usize,
    /// The 1-minute load average before and after the run (Linux), so that a
    /// reader can tell whether the machine was quiet.
    pub load: Option<(f64, f64)>,
    pub io: &'a str,
}

/// The width of a text column holding `cells`: the widest, and at least 9
/// (the width of the headings "algorithm" and "reference").
fn column_width<'a>(cells: impl Iterator<Item = &'a str>) -> usize {
    cells.map(str::len).max().unwrap_or(9).max(9)
}

/// One row: an algorithm's throughput.
struct Row<'a> {
    algorithm: &'a str,
    seconds: f64,
    gb_per_s: f64,
    files_per_s: f64,
    vs_fastest: f64,
}

impl Report<'_> {
    /// Results, fastest first.
    fn rows(&self) -> Vec<Row<'_>> {
        let fastest = self
            .results
            .iter()
            .map(|m| m.seconds)
            .fold(f64::INFINITY, f64::min);
        let mut rows: Vec<Row<'_>> = self
            .results
            .iter()
            .map(|m| Row {
                algorithm: &m.algorithm,
                seconds: m.seconds,
                gb_per_s: self.workload.bytes as f64 / m.seconds / 1e9,
                files_per_s: self.workload.files as f64 / m.seconds,
                vs_fastest: fastest / m.seconds,
            })
            .collect();
        rows.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        rows
    }

    fn gb_per_s(&self, seconds: f64) -> f64 {
        self.workload.bytes as f64 / seconds / 1e9
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "workload: {}; {} threads; io {}",
            self.workload.description, self.threads, self.io
        );
        if let Some((before, after)) = self.load {
            let _ = write!(s, "; load average {before:.2} before, {after:.2} after");
        }
        s.push_str("\n\n");
        let width = column_width(self.results.iter().map(|m| m.algorithm.as_str()));
        let _ = writeln!(
            s,
            "{:<width$}  {:>8}  {:>12}  {:>10}",
            "algorithm", "GB/s", "files/s", "vs fastest"
        );
        for r in self.rows() {
            let _ = writeln!(
                s,
                "{:<width$}  {:>8.2}  {:>12.1}  {:>10.2}",
                r.algorithm, r.gb_per_s, r.files_per_s, r.vs_fastest
            );
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(
                s,
                "\nagainst the reference tools (fleetsync sum vs each tool: a process each, \
                 output to /dev/null, warm cache, runs alternating, best run of each):\n"
            );
            let rw = column_width(self.comparisons.iter().map(|c| c.reference.as_str()));
            let _ = writeln!(
                s,
                "{:<width$}  {:<rw$}  {:>9}  {:>11}  {:>11}  {:>6}  {:>4}  {:>9}  {:>12}",
                "algorithm",
                "reference",
                "ours GB/s",
                "theirs GB/s",
                "ours/theirs",
                "target",
                "met",
                "CPU ratio",
                "round median"
            );
            for c in self.comparisons {
                let target = c.target.map(|t| format!("{t:.1}x")).unwrap_or_default();
                let met = match c.met() {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "",
                };
                let _ = writeln!(
                    s,
                    "{:<width$}  {:<rw$}  {:>9.2}  {:>11.2}  {:>10.2}x  {:>6}  {:>4}  {:>8.2}x  {:>11.2}x",
                    c.algorithm,
                    c.reference,
                    self.gb_per_s(c.ours_seconds),
                    self.gb_per_s(c.theirs_seconds),
                    c.ratio(),
                    target,
                    met,
                    c.cpu_ratio(),
                    c.median_round_ratio()
                );
            }
            s.push_str(
                "\nours/theirs: their wall time / ours. CPU ratio: their CPU time (user+system) / \
                 ours;\nabove 1 we do the same work with less CPU, which holds however busy the machine is.\n\
                 round median: the median over the rounds of their wall time / ours, each round\n\
                 running both back to back (robust to load that drifts during the run).\n",
            );
        }
        s
    }

    /// The same as one JSON document.
    pub fn json(&self) -> String {
        let results: Vec<_> = self
            .rows()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "algorithm": r.algorithm,
                    "seconds": r.seconds,
                    "gb_per_s": r.gb_per_s,
                    "files_per_s": r.files_per_s,
                    "vs_fastest": r.vs_fastest,
                })
            })
            .collect();
        let comparisons: Vec<_> = self
            .comparisons
            .iter()
            .map(|c| {
                serde_json::json!({
                    "algorithm": c.algorithm,
                    "reference": c.reference,
                    "ours_seconds": c.ours_seconds,
                    "theirs_seconds": c.theirs_seconds,
                    "ours_gb_per_s": self.gb_per_s(c.ours_seconds),
                    "theirs_gb_per_s": self.gb_per_s(c.theirs_seconds),
                    "ratio": c.ratio(),
                    "ours_cpu_seconds": c.ours_cpu_seconds,
                    "theirs_cpu_seconds": c.theirs_cpu_seconds,
                    "cpu_ratio": c.cpu_ratio(),
                    "round_ratios": c.round_ratios,
                    "median_round_ratio": c.median_round_ratio(),
                    "target": c.target,
                    "met": c.met(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "workload": {
                "description": self.workload.description,
                "tree": self.workload.tree,
                "bytes": self.workload.bytes,
                "files": self.workload.files,
            },
            "threads": self.threads,
            "load_average": self.load.map(|(before, after)| serde_json::json!({
                "before": before,
                "after": after,
            })),
            "io": self.io,
            "results": results,
            "comparisons": comparisons,
        });
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    }

    /// A horizontal bar chart of GB/s (files/s for trees), one `<rect>` per algorithm.
    pub fn svg(&self) -> String {
        let rows = self.rows();
        let (label_w, bar_w, bar_h, gap, top) = (150.0, 520.0, 18.0, 6.0, 40.0);
        let width = label_w + bar_w + 110.0;
        let height = top + rows.len() as f64 * (bar_h + gap) + 10.0;
        let value = |r: &Row<'_>| {
            if self.workload.tree {
                r.files_per_s
            } else {
                r.gb_per_s
            }
        };
        let unit = if self.workload.tree {
            "files/s"
        } else {
            "GB/s"
        };
        let max = rows.iter().map(value).fold(0.0, f64::max).max(1e-12);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
             viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(
            s,
            "  <text x=\"10\" y=\"22\" font-size=\"14\" font-weight=\"bold\">fleetsync bench: {} ({unit})</text>",
            xml_escape(&self.workload.description)
        );
        for (i, r) in rows.iter().enumerate() {
            let y = top + i as f64 * (bar_h + gap);
            let w = (value(r) / max * bar_w).max(1.0);
            let _ = writeln!(
                s,
                "  <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                label_w - 8.0,
                y + bar_h * 0.75,
                xml_escape(r.algorithm)
            );
            let _ = writeln!(
                s,
                "  <rect x=\"{label_w:.0}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{bar_h:.0}\" fill=\"#4a7ebb\"><title>{}: {:.3} {unit}</title></rect>",
                xml_escape(r.algorithm),
                value(r)
            );
            let _ = writeln!(
                s,
                "  <text x=\"{:.1}\" y=\"{:.1}\">{:.2}</text>",
                label_w + w + 6.0,
                y + bar_h * 0.75,
                value(r)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
