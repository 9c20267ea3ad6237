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
            let writable = one("ReadWritePaths");
            assert!(
                writable
                    .split_whitespace()
                    .any(|p| p.trim_start_matches('-') == root),
                "{unit}: ReadWritePaths={writable} lacks the tree {root}"
            );
            for cap in ["CAP_CHOWN", "CAP_FOWNER"] {
                assert!(one("CapabilityBoundingSet").contains(cap), "{unit}: {cap}");
            }
        }
    }
}

/// The capability numbers of linux/capability.h for the names the agent's unit may use.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_FSETID" => 4,
        other => panic!("add {other} to cap_number"),
    }
}

#[test]
fn the_agent_keeps_owners_modes_and_setuid_bits_with_only_the_units_capabilities() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: owners cannot be given, nothing to check");
        return;
    }
    let text = fs::read_to_string(packaging().join("fleetsync-agent.service")).unwrap();
    let caps: Vec<String> = ini(&text)
        .into_iter()
        .filter(|(s, k, _)| s == "Service" && k == "CapabilityBoundingSet")
        .flat_map(|(_, _, v)| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let mask: u64 = caps.iter().map(|c| 1u64 << cap_number(c)).sum();
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("master"), tmp.path().join("remote"));
    let file = |rel: &str, mode: u32, uid: u32, gid: u32| {
        let p = m.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("{rel}\n")).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    file("d/plain.txt", 0o640, 1234, 1234);
    file("d/setuid.bin", 0o4755, 1234, 1234);
    file("setgid.bin", 0o2750, 0, 999);
    file("private", 0o600, 4321, 4321);
    std::os::unix::fs::chown(m.join("d"), Some(4321), Some(999)).unwrap();
    fs::set_permissions(
        m.join("d"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    // An old file of another owner, which the agent must replace.
    fs::create_dir_all(&r).unwrap();
    fs::write(r.join("private"), "old\n").unwrap();
    std::os::unix::fs::chown(r.join("private"), Some(5555), Some(5555)).unwrap();
    fs::set_permissions(
        r.join("private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();

    let token = support::Token::new();
    let (_server, server) = token.server();
    let (_master, master) = token.agent(&m);
    // The remote agent as the unit runs it: root, bounded to the unit's capabilities,
    // no new privileges (setpriv(1) does what systemd does with those settings).
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg("--no-new-privs")
        .arg(BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token.file)
        .arg("--root")
        .arg(&r);
    support::isolate(&mut cmd, scratch_home());
    let (remote, remote_addr) = support::listening(&mut cmd);
    let status = fs::read_to_string(format!("/proc/{}/status", remote.0.id())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        cap_eff, mask,
        "the agent runs with other capabilities: {cap_eff:x}"
    );

    let out = token.sync(&server, &master, &[&remote_addr]);
    assert!(out.status.success());
    // rsync as root compares owners, groups and modes (-a) and contents (-c).
    assert_eq!(support::rsync_diff(&m, &r), "");
}
