//! The files under `packaging/`: the systemd units are valid and hardened, and the example
//! settings they start with are what `fleetsync agent`/`server --config` accept. (The Debian
//! package itself is built and checked by `packaging/check-deb.sh`, which `.ci/run` runs.)

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{fleetsync, scratch_home, BIN};

const UNITS: [&str; 2] = ["fleetsync-agent.service", "fleetsync-server.service"];

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

fn systemd_analyze_present() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `[Section]` and `Key=value` lines (the unit file syntax), as (section, key, value).
fn ini(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not Key=value: {line:?}", n + 1));
        assert!(!section.is_empty(), "line {}: outside a section", n + 1);
        assert!(
            !k.trim().is_empty() && k.trim().chars().all(|c| c.is_ascii_alphanumeric()),
            "line {}: bad key {k:?}",
            n + 1
        );
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

#[test]
fn the_units_are_valid_for_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let text = fs::read_to_string(packaging().join(unit)).unwrap();
        let keys = ini(&text);
        let sections: Vec<&str> = keys.iter().map(|(s, _, _)| s.as_str()).collect();
        for s in ["Unit", "Service", "Install"] {
            assert!(sections.contains(&s), "{unit}: no [{s}]");
        }
        if !systemd_analyze_present() {
            // No systemd-analyze here: only the simple syntax check above (sections and
            // Key=value lines) was made.
            eprintln!("{unit}: systemd-analyze not installed; checked the unit syntax only");
            continue;
        }
        // systemd-analyze verify: the real parser. It also checks that ExecStart's binary
        // exists, so the copy points at the binary under test.
        let copy = tmp.path().join(unit);
        fs::write(&copy, text.replace("/usr/bin/fleetsync", BIN)).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // It exits 0 on unknown keys and bad values (warnings): any line about our unit fails.
        let ours: Vec<&str> = err.lines().filter(|l| l.contains(unit)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}:\n{err}");
        eprintln!("{unit}: systemd-analyze verify ok");
    }
}

#[test]
fn the_units_are_hardened_notify_services_reading_the_example_settings() {
    for (unit, what) in UNITS.iter().zip(["agent", "server"]) {
        let text = fs::read_to_string(packaging().join(unit)).unwrap();
        let keys = ini(&text);
        let get = |k: &str| -> Vec<&str> {
            keys.iter()
                .filter(|(s, key, _)| s == "Service" && key == k)
                .map(|(_, _, v)| v.as_str())
                .collect()
        };
        let one = |k: &str| get(k).first().copied().unwrap_or_default();
        assert_eq!(one("Type"), "notify", "{unit}");
        assert_eq!(one("ProtectSystem"), "strict", "{unit}");
        for k in ["NoNewPrivileges", "PrivateTmp", "ProtectHome"] {
            assert_eq!(one(k), "yes", "{unit}: {k}");
        }
        assert!(
            one("RestrictAddressFamilies").contains("AF_UNIX"),
            "{unit}: sd_notify"
        );
        assert!(
            get("SystemCallFilter").contains(&"@system-service"),
            "{unit}"
        );
        assert!(!get("CapabilityBoundingSet").is_empty(), "{unit}");
        let conf = format!("/etc/fleetsync/{what}.toml");
        assert_eq!(
            one("ExecStart"),
            format!("/usr/bin/fleetsync {what} --config {conf}"),
            "{unit}"
        );
        // The example settings are accepted by the real binary.
        let example = packaging().join(format!("{what}.toml"));
        let out = fleetsync(scratch_home())
            .args([what, "--config"])
            .arg(&example)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", example.display());
        let effective: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
        if what == "agent" {
            // The tree it serves is writable under ProtectSystem=strict.
            let root = effective["root"].as_str().unwrap();
            assert!(one("ReadWritePaths").split_whitespace().any(|p| p == root));
            for cap in ["CAP_CHOWN", "CAP_FOWNER"] {
                assert!(one("CapabilityBoundingSet").contains(cap), "{unit}: {cap}");
            }
        }
    }
}
