//! A lab of "machines" for end-to-end tests that need a real network: each host is a Linux
//! network namespace on a bridge, its link capped at a rate, made by the `fleetlab` script
//! (`../shared/fleetlab/fleetlab` from the project root, or `$FLEETLAB`). Processes run in a
//! host with `fleetlab exec`; the file system is shared, so trees are ordinary directories.
//!
//! Needs root and iproute2. When the lab cannot be made, [`Lab::up`] panics saying why: a lab
//! test fails, it never passes without having run.
//!
//! ```ignore
//! let lab = Lab::up("sl", &["master", "srv", "r1"], "200mbit");
//! let addr = lab.spawn_listening("master", &agent_command);   // "198.18.0.2:41234"
//! let sent = lab.bytes("master", Dir::Tx);
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Proc;

/// Which counter of a host's link [`Lab::bytes`] reads.
#[derive(Clone, Copy, Debug)]
pub enum Dir {
    /// Bytes the host sent.
    Tx,
    /// Bytes the host received.
    Rx,
}

/// A running lab: its hosts and the processes started in them. Dropping it kills those
/// processes and removes the hosts.
pub struct Lab {
    prefix: String,
    script: PathBuf,
    hosts: Vec<(String, String)>,
    procs: Mutex<Vec<Proc>>,
    // Held while the lab lives: another test binary using the same prefix (a second worktree,
    // a rerun) waits instead of tearing this lab down under us.
    _lock: File,
}

/// The `fleetlab` script: `$FLEETLAB`, else `../shared/fleetlab/fleetlab` beside the project.
fn script() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETLAB") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fleetlab/fleetlab")
}

/// Panics with `why` and what a lab test needs: the test fails, loudly.
fn cannot(why: &str) -> ! {
    panic!(
        "cannot create the network lab: {why}\n\
         (lab tests need root, iproute2 (`ip`, `tc`) and the fleetlab script; \
         they fail rather than pass without running)"
    )
}

impl Lab {
    /// Makes hosts `hosts` (each link capped at `rate`, e.g. "200mbit") in the lab named
    /// `prefix` (1-4 lower-case letters/digits; each test its own, as tests run in parallel).
    /// A lab of that name left by an earlier run that died is removed first. Panics, failing
    /// the test, when the lab cannot be made (not root, no iproute2, no fleetlab).
    pub fn up(prefix: &str, hosts: &[&str], rate: &str) -> Lab {
        Lab::up_with(prefix, hosts, rate, &[])
    }

    /// As [`Lab::up`], with the links of some hosts capped at other rates (`(host, rate)`).
    pub fn up_with(prefix: &str, hosts: &[&str], rate: &str, uplinks: &[(&str, &str)]) -> Lab {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            cannot("not running as root (network namespaces need it)");
        }
        match Command::new("ip").arg("-V").output() {
            Ok(o) if o.status.success() => {}
            _ => cannot("`ip` (iproute2) is not installed (apt-get install iproute2)"),
        }
        let script = script();
        if !script.is_file() {
            cannot(&format!(
                "no fleetlab script at {} (set FLEETLAB to its path)",
                script.display()
            ));
        }
        let lock_path = format!("/run/fleetlab-{prefix}.lock");
        let lock =
            File::create(&lock_path).unwrap_or_else(|e| cannot(&format!("{lock_path}: {e}")));
        // SAFETY: flock on a descriptor this function owns; it only blocks until the lock is
        // free, and the lock goes with the descriptor when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            cannot(&format!(
                "flock {lock_path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            script,
            hosts: Vec::new(),
            procs: Mutex::new(Vec::new()),
            _lock: lock,
        };
        lab.down();
        let out = lab
            .fleetlab(&["up"])
            .args(hosts)
            .args(["--rate", rate])
            .args(
                uplinks
                    .iter()
                    .flat_map(|(h, r)| ["--uplink".to_owned(), format!("{h}={r}")]),
            )
            .output()
            .unwrap_or_else(|e| cannot(&format!("running {}: {e}", lab.script.display())));
        if !out.status.success() {
            cannot(&format!(
                "fleetlab up {hosts:?} --rate {rate}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for h in hosts {
            let out = lab.fleetlab(&["addr", h]).output().unwrap();
            assert!(out.status.success(), "fleetlab addr {h}: {out:?}");
            let addr = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            lab.hosts.push((h.to_string(), addr));
        }
        lab
    }

    /// `fleetlab ARGS...` for this lab.
    fn fleetlab(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .args(args)
            .env("FLEETLAB_PREFIX", &self.prefix);
        cmd
    }

    fn down(&self) {
        match self.fleetlab(&["down"]).output() {
            Ok(o) if o.status.success() => {}
            r => eprintln!("fleetlab down (prefix {}): {r:?}", self.prefix),
        }
    }

    /// The IPv4 address of `host`.
    pub fn addr(&self, host: &str) -> &str {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no lab host {host}"))
    }

    /// `cmd` (its program, arguments, environment and directory) made to run inside `host`.
    /// The child's pid is the program's own (`fleetlab exec` and `ip netns exec` exec it).
    pub fn command(&self, host: &str, cmd: &Command) -> Command {
        let mut c = self.fleetlab(&["exec", host]);
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Starts `cmd` inside `host` (its stdout and stderr go to the test's); the lab kills it
    /// when dropped. Returns its pid.
    pub fn spawn(&self, host: &str, cmd: &Command) -> u32 {
        let child = self
            .command(host, cmd)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {host}: {e}"));
        let pid = child.id();
        self.procs.lock().unwrap().push(Proc(child));
        pid
    }

    /// Starts `cmd` (a `fleetsync agent` or `server`) inside `host`, as [`Lab::spawn`] does,
    /// and returns the address of its first stdout line `listening on ADDR`.
    pub fn spawn_listening(&self, host: &str, cmd: &Command) -> String {
        let mut child = self
            .command(host, cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {host}: {e}"));
        let stdout = child.stdout.take().unwrap();
        self.procs.lock().unwrap().push(Proc(child));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{cmd:?} in {host}: first line {line:?}"))
            .to_owned()
    }

    /// Runs `cmd` inside `host` to the end (killed, and the test failed, after `limit`);
    /// returns its output.
    pub fn run(&self, host: &str, cmd: &Command, limit: Duration) -> Output {
        let mut child = self
            .command(host, cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {host}: {e}"));
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        let start = Instant::now();
        let mut killed = false;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                killed = true;
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        assert!(
            !killed,
            "{cmd:?} in {host} ran longer than {limit:?}; killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Bytes `host` has sent ([`Dir::Tx`]) or received ([`Dir::Rx`]) on its link, headers
    /// included (the kernel's counters of its interface).
    pub fn bytes(&self, host: &str, dir: Dir) -> u64 {
        let d = match dir {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        };
        let out = self.fleetlab(&["bytes", host, d]).output().unwrap();
        assert!(out.status.success(), "fleetlab bytes {host} {d}: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("fleetlab bytes {host} {d}: {e}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first: a namespace goes only once nothing runs in it.
        self.procs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.down();
    }
}
