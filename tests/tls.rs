//! TLS with fleet certificates (`--tls DIR`, `fleetsync cert`), with real processes: a
//! whole `--server` sync over TLS checked by rsync, certificates checked by openssl, and
//! each refusal (plaintext peer, wrong CA, expired certificate, another role, a stalled
//! handshake) refused and logged on both sides while the process keeps serving.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetsync_proto::{auth, Role};

mod support;
use support::{fleetsync, listening, logged, rsync_diff, scratch_home, Proc};

/// A fleet CA and the certificates of a test, in a temporary directory.
struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new() -> Fleet {
        let f = Fleet {
            dir: tempfile::tempdir().unwrap(),
        };
        f.init("ca");
        f.issue("ca", "agent", "agent1", &["127.0.0.1"]);
        f.issue("ca", "agent", "agent2", &["127.0.0.1"]);
        f.issue("ca", "server", "server", &["127.0.0.1"]);
        f.issue("ca", "control", "control", &[]);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn init(&self, ca: &str) {
        let out = fleetsync(scratch_home())
            .args(["cert", "init"])
            .arg(self.path(ca))
            .output()
            .unwrap();
        assert!(out.status.success(), "cert init: {out:?}");
    }

    fn issue(&self, ca: &str, role: &str, name: &str, sans: &[&str]) {
        let mut cmd = fleetsync(scratch_home());
        cmd.args(["cert", "issue", "--ca"])
            .arg(self.path(ca))
            .args(["--role", role, name, "--out"])
            .arg(self.path(name));
        for s in sans {
            cmd.args(["--san", s]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "cert issue: {out:?}");
    }

    /// An identity directory holding `ca`'s certificate as trust anchor, with the
    /// certificate and key of `from` (issued by whatever CA `from` had).
    fn mixed(&self, name: &str, ca: &str, from: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.path(ca).join("ca.pem"), dir.join("ca.pem")).unwrap();
        std::fs::copy(self.path(from).join("cert.pem"), dir.join("cert.pem")).unwrap();
        std::fs::copy(self.path(from).join("key.pem"), dir.join("key.pem")).unwrap();
        dir
    }
}

/// A process with its stderr in a file, to look for what it logged.
struct Logged {
    proc: Proc,
    addr: String,
    log: PathBuf,
}

impl Logged {
    fn start(mut cmd: Command, log: PathBuf) -> Logged {
        cmd.stderr(File::create(&log).unwrap());
        let (proc, addr) = listening(&mut cmd);
        Logged { proc, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `what` (the process logs it as it happens); panics with
    /// the log after a minute without it.
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.log().contains(what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the log never said {what:?}:\n{}", self.log());
    }

    fn alive(&mut self) -> bool {
        self.proc.alive()
    }
}

fn agent(root: &Path, tls: Option<&Path>, log: PathBuf) -> Logged {
    let mut cmd = fleetsync(scratch_home());
    cmd.arg("agent")
        .arg("--root")
        .arg(root)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("FLEETSYNC_TOKEN");
    match tls {
        Some(d) => cmd.arg("--tls").arg(d),
        None => cmd.arg("--insecure-no-auth"),
    };
    Logged::start(cmd, log)
}

fn server(tls: Option<&Path>, log: PathBuf) -> Logged {
    let mut cmd = fleetsync(scratch_home());
    cmd.args(["server", "--listen", "127.0.0.1:0"])
        .env_remove("FLEETSYNC_TOKEN");
    match tls {
        Some(d) => cmd.arg("--tls").arg(d),
        None => cmd.arg("--insecure-no-auth"),
    };
    Logged::start(cmd, log)
}

fn sync(server: &str, tls: Option<&Path>, master: &str, remotes: &[&str]) -> Output {
    let mut cmd = fleetsync(scratch_home());
    cmd.args(["sync", "--delete", "--server", server, "--master", master])
        .env_remove("FLEETSYNC_TOKEN");
    match tls {
        Some(d) => cmd.arg("--tls").arg(d),
        None => cmd.arg("--insecure-no-auth"),
    };
    cmd.args(remotes);
    logged("sync", cmd.output().unwrap())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A master tree worth syncing: a few MiB of pseudo-random data, small files, a link.
fn fill(master: &Path, seed: u64) {
    let mut rng = support::Rng(seed);
    std::fs::create_dir_all(master.join("d/e")).unwrap();
    let big: Vec<u8> = (0..6 << 20).map(|_| rng.next() as u8).collect();
    std::fs::write(master.join("big.bin"), &big).unwrap();
    for i in 0..20 {
        std::fs::write(master.join(format!("d/e/f{i}")), format!("file {i}\n")).unwrap();
    }
    std::os::unix::fs::symlink("big.bin", master.join("link")).unwrap();
}

/// A TLS fleet: two agents and a server, each with its certificate.
struct TlsFleet {
    fleet: Fleet,
    trees: tempfile::TempDir,
    master: Logged,
    remote: Logged,
    server: Logged,
}

impl TlsFleet {
    fn start() -> TlsFleet {
        let fleet = Fleet::new();
        let trees = tempfile::tempdir().unwrap();
        let (m, r) = (trees.path().join("master"), trees.path().join("remote"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(&r).unwrap();
        fill(&m, 7);
        let logs = trees.path();
        let master = agent(&m, Some(&fleet.path("agent1")), logs.join("master.log"));
        let remote = agent(&r, Some(&fleet.path("agent2")), logs.join("remote.log"));
        let server = server(Some(&fleet.path("server")), logs.join("server.log"));
        TlsFleet {
            fleet,
            trees,
            master,
            remote,
            server,
        }
    }

    fn tree(&self, name: &str) -> PathBuf {
        self.trees.path().join(name)
    }

    fn sync_with(&self, control: &Path) -> Output {
        sync(
            &self.server.addr,
            Some(control),
            &self.master.addr,
            &[&self.remote.addr],
        )
    }

    fn sync(&self) -> Output {
        self.sync_with(&self.fleet.path("control"))
    }

    /// A good sync still works, and leaves the trees identical (rsync says nothing).
    fn still_serves(&mut self) {
        let out = self.sync();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(rsync_diff(&self.tree("master"), &self.tree("remote")), "");
        assert!(self.master.alive() && self.remote.alive() && self.server.alive());
    }
}

#[test]
fn certificates_verify_with_openssl_and_carry_their_role() {
    let fleet = Fleet::new();
    let ca = fleet.path("ca").join("ca.pem");
    for name in ["agent1", "server", "control"] {
        let cert = fleet.path(name).join("cert.pem");
        let out = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca)
            .arg(&cert)
            .output()
            .expect("openssl must be installed");
        assert!(out.status.success(), "openssl verify {name}: {out:?}");
        let key = fleet.path(name).join("key.pem");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{name}'s key");
    }
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(fleet.path("agent1").join("cert.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:fleetsync:role:agent"), "{text}");
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    let ca_key = fleet.path("ca").join("ca.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ca_key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The key matches the certificate (openssl's own check).
    let pubkey = |args: &[&str], file: PathBuf| {
        let o = Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        o.stdout
    };
    assert_eq!(
        pubkey(
            &["x509", "-noout", "-pubkey", "-in"],
            fleet.path("server").join("cert.pem")
        ),
        pubkey(
            &["pkey", "-pubout", "-in"],
            fleet.path("server").join("key.pem")
        )
    );
    // Nothing is overwritten.
    let again = fleetsync(scratch_home())
        .args(["cert", "init"])
        .arg(fleet.path("ca"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(
        stderr(&again).contains("exists already"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn a_server_mode_sync_over_tls_leaves_the_remote_identical() {
    let mut f = TlsFleet::start();
    f.still_serves();
    // An update: a delta over the agent-to-agent stream (basis queries and replies both
    // ways on one TLS connection), a deletion, a new file.
    let m = f.tree("master");
    let mut big = std::fs::read(m.join("big.bin")).unwrap();
    for b in &mut big[1 << 20..(1 << 20) + 4096] {
        *b = !*b;
    }
    std::fs::write(m.join("big.bin"), &big).unwrap();
    std::fs::remove_file(m.join("d/e/f3")).unwrap();
    std::fs::write(m.join("new"), b"new file\n").unwrap();
    f.still_serves();
    assert!(!f.master.log().contains("WARN"), "{}", f.master.log());
    assert!(!f.remote.log().contains("WARN"), "{}", f.remote.log());
}

#[test]
fn a_plaintext_client_is_told_that_tls_is_required() {
    let mut f = TlsFleet::start();
    // Against the TLS server.
    let out = sync(&f.server.addr, None, &f.master.addr, &[&f.remote.addr]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));
    f.server.wait_log("a plaintext client");
    // Against a TLS agent: the token handshake of a plaintext connector.
    let mut s = TcpStream::connect(&f.remote.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let err = auth::connect(&mut s, None, Role::Server).unwrap_err();
    assert!(err.to_string().contains("requires TLS"), "{err}");
    f.remote.wait_log("a plaintext connector");
    f.still_serves();
}

#[test]
fn a_tls_server_refuses_a_plaintext_agent() {
    let f = Fleet::new();
    let trees = tempfile::tempdir().unwrap();
    let (m, r) = (trees.path().join("m"), trees.path().join("r"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::create_dir_all(&r).unwrap();
    fill(&m, 3);
    let master = agent(&m, Some(&f.path("agent1")), trees.path().join("m.log"));
    let plain = agent(&r, None, trees.path().join("r.log"));
    let mut srv = server(Some(&f.path("server")), trees.path().join("s.log"));
    let out = sync(
        &srv.addr,
        Some(&f.path("control")),
        &master.addr,
        &[&plain.addr],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("does not speak TLS"),
        "{}",
        stderr(&out)
    );
    srv.wait_log("does not speak TLS");
    plain.wait_log("the connector speaks TLS");
    assert!(srv.alive());
    assert_eq!(std::fs::read_dir(&r).unwrap().count(), 0, "nothing written");
}

#[test]
fn a_certificate_of_another_ca_is_refused_on_both_sides() {
    let mut f = TlsFleet::start();
    f.fleet.init("other-ca");
    f.fleet.issue("other-ca", "control", "stranger", &[]);
    // A control client of another fleet trusting ours: the server refuses its certificate.
    let stranger = f.fleet.mixed("stranger-trusting-us", "ca", "stranger");
    let out = f.sync_with(&stranger);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("does not trust our CA"),
        "{}",
        stderr(&out)
    );
    f.server.wait_log("not issued by our fleet CA");
    // The same client trusting only its own CA refuses the server.
    let out = f.sync_with(&f.fleet.path("stranger"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not issued by our fleet CA"),
        "{}",
        stderr(&out)
    );
    f.server.wait_log("does not trust our CA");
    // An agent of another fleet: the server refuses it as the remote.
    f.fleet
        .issue("other-ca", "agent", "stranger-agent", &["127.0.0.1"]);
    let intruder_tree = f.tree("intruder");
    std::fs::create_dir_all(&intruder_tree).unwrap();
    let intruder_dir = f.fleet.mixed("intruder", "ca", "stranger-agent");
    let intruder = agent(&intruder_tree, Some(&intruder_dir), f.tree("intruder.log"));
    let out = sync(
        &f.server.addr,
        Some(&f.fleet.path("control")),
        &f.master.addr,
        &[&intruder.addr],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("not issued by our fleet CA"),
        "{}",
        stderr(&out)
    );
    intruder.wait_log("does not trust our CA");
    assert_eq!(std::fs::read_dir(&intruder_tree).unwrap().count(), 0);
    f.still_serves();
}

/// Writes a certificate of `role` signed by the test fleet's CA that expired yesterday.
fn expired_identity(fleet: &Fleet, name: &str, role: &str) -> PathBuf {
    let ca_dir = fleet.path("ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
    )
    .unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.subject_alt_names = vec![
        rcgen::SanType::URI(format!("fleetsync:role:{role}").try_into().unwrap()),
        rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = fleet.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ca_dir.join("ca.pem"), dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    let mut k = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(&mut k, 0o600);
    k.write(true)
        .create_new(true)
        .open(dir.join("key.pem"))
        .unwrap()
        .write_all(key.serialize_pem().as_bytes())
        .unwrap();
    // openssl agrees that it has expired.
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expired")
            || String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{out:?}"
    );
    dir
}

#[test]
fn an_expired_certificate_is_refused_on_both_sides() {
    let mut f = TlsFleet::start();
    let expired = expired_identity(&f.fleet, "expired-control", "control");
    let out = f.sync_with(&expired);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("our certificate has expired"),
        "{}",
        stderr(&out)
    );
    f.server.wait_log("refused the peer's certificate: expired");
    // An agent whose certificate expired: the server refuses to send it anything.
    let expired_agent = expired_identity(&f.fleet, "expired-agent", "agent");
    let tree = f.tree("stale");
    std::fs::create_dir_all(&tree).unwrap();
    let stale = agent(&tree, Some(&expired_agent), f.tree("stale.log"));
    let out = sync(
        &f.server.addr,
        Some(&f.fleet.path("control")),
        &f.master.addr,
        &[&stale.addr],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    stale.wait_log("our certificate has expired");
    f.still_serves();
}

#[test]
fn a_certificate_of_another_role_is_refused() {
    let mut f = TlsFleet::start();
    // An agent's certificate cannot act as a control client: refused before connecting.
    let out = f.sync_with(&f.fleet.path("agent1"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("needs a control certificate"),
        "{}",
        stderr(&out)
    );
    // The same certificate presented to the server by a TLS client that does not check
    // (openssl s_client): the server refuses the role.
    let agent1 = f.fleet.path("agent1");
    let s_client = |addr: &str, id: &Path| {
        let mut child = Command::new("openssl")
            .args(["s_client", "-tls1_3", "-connect", addr, "-cert"])
            .arg(id.join("cert.pem"))
            .arg("-key")
            .arg(id.join("key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl must be installed");
        // Keep stdin open a moment so that the server's verdict arrives, then end.
        std::thread::sleep(Duration::from_millis(500));
        drop(child.stdin.take());
        let mut text = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        child.wait().unwrap();
        text
    };
    let said = s_client(&f.server.addr, &agent1);
    assert!(said.contains("alert"), "{said}");
    f.server
        .wait_log("the peer's certificate has role agent, expected control");
    // A control certificate presented to an agent.
    let said = s_client(&f.remote.addr, &f.fleet.path("control"));
    assert!(said.contains("alert"), "{said}");
    f.remote
        .wait_log("the peer's certificate has role control, expected server or agent");
    // A server whose "agent" is a server: it refuses the role.
    let out = sync(
        &f.server.addr,
        Some(&f.fleet.path("control")),
        &f.server.addr,
        &[&f.remote.addr],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("has role server, expected agent"),
        "{}",
        stderr(&out)
    );
    f.still_serves();
}

#[test]
fn a_stalled_handshake_holds_up_nobody() {
    let mut f = TlsFleet::start();
    // Peers that start a TLS record and say no more.
    let mut stalled = Vec::new();
    for addr in [&f.server.addr, &f.remote.addr, &f.master.addr] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).unwrap();
        stalled.push(s);
    }
    f.still_serves();
    f.still_serves();
    f.server.wait_log("did not finish the handshake");
    f.remote.wait_log("did not finish the handshake in time");
    f.master.wait_log("did not finish the handshake in time");
    f.still_serves();
    drop(stalled);
}

// ------------------------------------------------------------------ authority per order

use fleetsync_proto::tls::{server_name, Identity, Stream};
use fleetsync_proto::{frame, ticket, FileEntry, FileKind, Msg};

/// A TLS connection from the test to `addr` with `id`'s certificate, authenticated as
/// `role` (no token).
fn dial(addr: &str, id: &Identity, role: Role) -> Stream {
    let config = id.client_config(&[Role::Agent]).unwrap();
    let mut s = Stream::connect(
        TcpStream::connect(addr).unwrap(),
        &config,
        server_name(addr).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    auth::connect(&mut s, None, role).unwrap();
    s
}

fn put(s: &mut Stream, m: &Msg) {
    frame::write_frame(s, &m.encode()).unwrap();
    s.flush().unwrap();
}

/// What the remote answers a stream: its first frame (or `None` if it closed).
fn answer(s: &mut Stream) -> Option<Msg> {
    match frame::read_frame(s) {
        Ok(Some(body)) => Some(Msg::decode(&body).unwrap()),
        _ => None,
    }
}

fn file_start(path: &[u8]) -> Msg {
    Msg::FileStart {
        request_id: 1,
        entry: FileEntry {
            path: path.to_vec(),
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            inode: 0,
            dev: 0,
            nlink: 1,
            size: 5,
            mtime_sec: 0,
            mtime_nsec: 0,
            link_target: None,
            rdev: 0,
            digest: None,
        },
        algorithm: "crc32".into(),
        lock_timeout_ms: None,
        stage: String::new(),
        coding: Default::default(),
        basis: Vec::new(),
        basis_size: 0,
    }
}

fn refused_with(reply: Option<Msg>, what: &str) {
    match reply {
        Some(Msg::Error { message, .. }) => assert!(message.contains(what), "{message}"),
        other => panic!("expected a refusal saying {what:?}, got {other:?}"),
    }
}

#[test]
fn a_remote_takes_file_data_only_with_a_fresh_ticket_of_its_server() {
    let mut f = TlsFleet::start();
    let server_id = Identity::load(&f.fleet.path("server")).unwrap();
    // The sender: an agent of the fleet (a compromised one would hold such a certificate).
    f.fleet.issue("ca", "agent", "agent3", &["127.0.0.1"]);
    let sender_id = Identity::load(&f.fleet.path("agent3")).unwrap();
    let remote_cert = {
        let r = Identity::load(&f.fleet.path("agent2")).unwrap();
        r.cert().to_vec()
    };
    let signer = server_id.signing_key().unwrap();
    let ticket_for = |remote: &[u8], paths: &[&[u8]]| {
        let t = ticket::Ticket::new(
            sender_id.cert(),
            remote,
            paths.iter().map(|p| p.to_vec()).collect(),
        );
        ticket::sign(&t, &*signer).unwrap()
    };

    // No server connected to the remote: nobody vouches for any ticket.
    let good = ticket_for(&remote_cert, &[b"granted"]);
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(
        &mut s,
        &Msg::StreamTicket {
            ticket: good.clone(),
        },
    );
    refused_with(answer(&mut s), "no server is connected");

    // The test now plays the server too: its control-plane connection to the remote.
    let _control_plane = dial(&f.remote.addr, &server_id, Role::Server);

    // No ticket at all: the first file is refused.
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(&mut s, &file_start(b"pushed"));
    refused_with(answer(&mut s), "no ticket from the server");
    f.remote.wait_log("refused a file stream: no ticket");

    // A ticket the sender forged with its own key.
    let forged = {
        let t = ticket::Ticket::new(sender_id.cert(), &remote_cert, vec![b"pushed".to_vec()]);
        ticket::sign(&t, &*sender_id.signing_key().unwrap()).unwrap()
    };
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(&mut s, &Msg::StreamTicket { ticket: forged });
    refused_with(answer(&mut s), "not our server's (forged?)");

    // A good ticket with a flipped bit.
    let mut tampered = good.clone();
    tampered[40] ^= 1;
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(&mut s, &Msg::StreamTicket { ticket: tampered });
    refused_with(answer(&mut s), "not our server's");

    // A ticket for another remote.
    let elsewhere = ticket_for(server_id.cert(), &[b"granted"]);
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(&mut s, &Msg::StreamTicket { ticket: elsewhere });
    refused_with(answer(&mut s), "for another remote agent");

    // Someone else's ticket (issued to agent3) presented by agent1.
    let other_sender = Identity::load(&f.fleet.path("agent1")).unwrap();
    let mut s = dial(&f.remote.addr, &other_sender, Role::Agent);
    put(
        &mut s,
        &Msg::StreamTicket {
            ticket: good.clone(),
        },
    );
    refused_with(answer(&mut s), "issued to another sender");

    // The good ticket: the stream is taken, but only for its paths.
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(
        &mut s,
        &Msg::StreamTicket {
            ticket: good.clone(),
        },
    );
    put(&mut s, &file_start(b"not-granted"));
    refused_with(answer(&mut s), "does not cover it");
    assert!(!f.tree("remote").join("not-granted").exists());

    // Replayed: the same ticket a second time.
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(&mut s, &Msg::StreamTicket { ticket: good });
    refused_with(answer(&mut s), "used already (a replay)");
    f.remote
        .wait_log("refused a file stream: the ticket was used already");

    // A fresh good ticket and an empty stream: accepted (`done`).
    let mut s = dial(&f.remote.addr, &sender_id, Role::Agent);
    put(
        &mut s,
        &Msg::StreamTicket {
            ticket: ticket_for(&remote_cert, &[b"granted"]),
        },
    );
    put(&mut s, &Msg::StreamEnd);
    match answer(&mut s) {
        Some(Msg::Done(_)) => {}
        other => panic!("expected done, got {other:?}"),
    }
    // And the real server's tickets work.
    drop(s);
    f.still_serves();
}

/// Relays under TLS: every edge of the server's distribution tree (master to the first
/// remote, each relay to its children) carries its own ticket, signed for that sender and
/// that child, and each child checks it.
#[test]
fn relayed_streams_over_tls_carry_a_ticket_per_edge_and_leave_every_remote_identical() {
    let fleet = Fleet::new();
    for i in 3..=5 {
        fleet.issue("ca", "agent", &format!("agent{i}"), &["127.0.0.1"]);
    }
    let trees = tempfile::tempdir().unwrap();
    let m = trees.path().join("master");
    std::fs::create_dir_all(&m).unwrap();
    fill(&m, 11);
    let logs = trees.path();
    let master = agent(&m, Some(&fleet.path("agent1")), logs.join("master.log"));
    let mut remotes = Vec::new();
    for i in 2..=5 {
        let r = trees.path().join(format!("r{i}"));
        std::fs::create_dir_all(&r).unwrap();
        let who = fleet.path(&format!("agent{i}"));
        remotes.push((
            r,
            agent(
                &m.with_file_name(format!("r{i}")),
                Some(&who),
                logs.join(format!("r{i}.log")),
            ),
        ));
    }
    let server = server(Some(&fleet.path("server")), logs.join("server.log"));
    let addrs: Vec<&str> = remotes.iter().map(|(_, a)| a.addr.as_str()).collect();
    let mut cmd = fleetsync(scratch_home());
    cmd.args([
        "sync",
        "--delete",
        "--json",
        "--fanout",
        "1",
        "--server",
        &server.addr,
    ])
    .args(["--master", &master.addr, "--tls"])
    .arg(fleet.path("control"))
    .env_remove("FLEETSYNC_TOKEN")
    .args(&addrs);
    let out = logged("sync", cmd.output().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sync --json");
    // --fanout 1: a chain, master -> one remote -> the next ...: all but one came by relay.
    let relayed = doc["remotes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["source"].as_str().is_some_and(|s| s != "master"))
        .count();
    assert_eq!(relayed, 3, "{doc}");
    for (r, a) in &remotes {
        assert_eq!(rsync_diff(&m, r), "", "{}", r.display());
        assert!(!a.log().contains("refused"), "{}", a.log());
    }
}
