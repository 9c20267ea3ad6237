//! `fleetsync bench` on tiny workloads: the table, the JSON and the SVG a user gets.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fleetsync");

fn bench(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .output()
        .expect("running fleetsync bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bench {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn prints_a_table_with_one_row_per_algorithm() {
    let (out, _) = bench(&["--size", "256KiB", "-a", "crc32,md5", "--runs", "1"]);
    let header = out
        .lines()
        .find(|l| l.starts_with("algorithm"))
        .unwrap_or_else(|| panic!("no table header in:\n{out}"));
    for column in ["GB/s", "files/s", "vs fastest"] {
        assert!(header.contains(column), "{header}");
    }
    for alg in ["crc32", "md5"] {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(alg))
            .unwrap_or_else(|| panic!("no {alg} row in:\n{out}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.len(), 4, "{row}");
        for c in &cols[1..] {
            c.parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number: {c} in {row}"));
        }
    }
    // The fastest is 1.00 of itself.
    assert!(out.lines().any(|l| l.ends_with("1.00")), "{out}");
}

#[test]
fn json_is_one_valid_document() {
    let (out, _) = bench(&[
        "--size",
        "128KiB",
        "-a",
        "crc32,sha256",
        "--runs",
        "1",
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert!(["crc32", "sha256"].contains(&r["algorithm"].as_str().unwrap()));
        assert!(r["gb_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["files_per_s"].as_f64().unwrap() > 0.0);
        let ratio = r["vs_fastest"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio <= 1.0);
    }
    assert_eq!(doc["workload"]["bytes"], 128 * 1024);
    assert_eq!(doc["workload"]["tree"], false);
}

#[test]
fn svg_has_one_bar_per_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("chart.svg");
    bench(&[
        "--size",
        "64KiB",
        "-a",
        "crc32,md5",
        "--runs",
        "1",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{text}");
    assert!(text.trim_end().ends_with("</svg>"));
    assert_eq!(text.matches("<rect").count(), 2, "{text}");
    // XML-ish: every element that opens is closed.
    for tag in ["svg", "text", "rect", "title"] {
        assert_eq!(
            text.matches(&format!("<{tag} ")).count() + text.matches(&format!("<{tag}>")).count(),
            text.matches(&format!("</{tag}>")).count(),
            "unbalanced <{tag}>"
        );
    }
    for alg in ["crc32", "md5"] {
        assert!(text.contains(&format!(">{alg}</text>")));
    }
}

#[test]
fn tree_workload_counts_files() {
    let (out, _) = bench(&[
        "--files",
        "50",
        "--file-size",
        "1KiB",
        "-a",
        "cksum",
        "--runs",
        "1",
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["workload"]["files"], 50);
    assert_eq!(doc["workload"]["tree"], true);
    assert_eq!(doc["workload"]["bytes"], 50 * 1024);
}

#[test]
fn path_workload_uses_the_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mine.bin");
    std::fs::write(&f, vec![7u8; 10_000]).unwrap();
    let (out, _) = bench(&[
        "--path",
        f.to_str().unwrap(),
        "-a",
        "crc32",
        "--runs",
        "1",
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["workload"]["bytes"], 10_000);
}

#[test]
fn compare_times_the_coreutils_references() {
    let (out, _) = bench(&[
        "--size",
        "64KiB",
        "-a",
        "cksum,md5,bsd",
        "--runs",
        "3",
        "--compare",
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let refs: Vec<(&str, &str)> = doc["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["algorithm"].as_str().unwrap(),
                c["reference"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refs,
        [("cksum", "cksum"), ("md5", "md5sum"), ("bsd", "sum -r")]
    );
    for c in doc["comparisons"].as_array().unwrap() {
        assert!(c["ratio"].as_f64().unwrap() > 0.0);
        assert!(c["ours_cpu_seconds"].as_f64().unwrap() >= 0.0);
        assert!(c["cpu_ratio"].as_f64().unwrap() >= 0.0);
        assert!(c["target"].as_f64().is_some());
        // One ratio per round, and the median is one of them (3 rounds).
        let rounds: Vec<f64> = c["round_ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        assert_eq!(rounds.len(), 3, "{c}");
        assert!(rounds.iter().all(|r| *r > 0.0), "{c}");
        let median = c["median_round_ratio"].as_f64().unwrap();
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(median, sorted[1], "{c}");
    }
}
