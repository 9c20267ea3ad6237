//! The control client: connects to a `fleetsync server` (a running one, or
//! the embedded one), sends one sync request, shows its progress and collects
//! the answer. `sync` and `verify` both go through [`send`].

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::net::TcpStream;

use anyhow::{bail, Context};
use fleetsync_proto::tls::{Identity, Stream};
use fleetsync_proto::{auth, frame, Action, Msg, PlanItem, RemoteResult, Role, SyncRequest};

use super::itemize::{escape_path, item_line};

/// What the client shows while the server works.
#[derive(Clone, Copy, Debug)]
pub enum Display {
    /// Print nothing; keep every plan item in the reply (`sync --json`, `verify`).
    Collect,
    /// Print plan items as lines when `itemize` (else a note on stderr for each skipped
    /// entry); a progress bar of the bytes sent when `progress` and stderr is a terminal.
    Print {
        /// One line per plan item on stdout.
        itemize: bool,
        /// A progress bar on stderr.
        progress: bool,
    },
}

/// Everything the server answered to one sync request.
pub struct SyncReply {
    /// Each remote's result, by its index in the request.
    pub results: BTreeMap<u32, RemoteResult>,
    /// The plan items, with [`Display::Collect`] only.
    pub items: Vec<PlanItem>,
    /// `syncDone`'s verdict.
    pub done_ok: bool,
    /// `syncDone`'s message.
    pub done_message: String,
}

/// Sends `req` to the server at `server` and reads its answers until `syncDone`, showing
/// them as `display` says; `labels` names the remotes (by index) in what is printed.
/// With `tls` (a `control` certificate) the connection is TLS and the server must present
/// a `server` certificate naming the host of `server`.
pub fn send(
    server: &str,
    token: Option<&[u8]>,
    tls: Option<&Identity>,
    req: SyncRequest,
    display: Display,
    labels: &[String],
) -> anyhow::Result<SyncReply> {
    let stream =
        TcpStream::connect(server).with_context(|| format!("connecting to the server {server}"))?;
    let _ = stream.set_nodelay(true);
    let stream = match tls {
        Some(id) => {
            if id.role() != Role::Control {
                bail!(
                    "--tls {}: a {} certificate; a control client needs a control certificate \
                     (fleetsync cert issue --role control)",
                    id.dir().display(),
                    id.role().name()
                );
            }
            let config = id.client_config(&[Role::Server])?;
            let name = fleetsync_proto::tls::server_name(server)?;
            Stream::connect(stream, &config, name, std::time::Duration::from_secs(15))
                .with_context(|| format!("connecting to the server {server}"))?
        }
        None => Stream::plain(stream),
    };
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    {
        let mut both = ReadWrite {
            r: &mut reader,
            w: &mut writer,
        };
        auth::connect(&mut both, token, Role::Control)
            .with_context(|| format!("authenticating with the server {server}"))?;
    }
    frame::write_frame(&mut writer, &Msg::SyncRequest(req).encode())?;
    writer.flush()?;

    let multi = labels.len() > 1;
    let (collect, show_items, progress) = match display {
        Display::Collect => (true, false, false),
        Display::Print { itemize, progress } => (false, itemize, progress),
    };
    let bar = if progress && std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let mut total_bytes: u64 = 0;
    let mut done_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    let mut out = SyncReply {
        results: BTreeMap::new(),
        items: Vec::new(),
        done_ok: false,
        done_message: String::new(),
    };
    let stdout = std::io::stdout();
    loop {
        let body = frame::read_frame(&mut reader)
            .context("reading from the server")?
            .context("the server closed the connection before finishing")?;
        match Msg::decode(&body)? {
            Msg::PlanItems(items) => {
                for it in items {
                    if it.action == Action::Transfer {
                        total_bytes += it.size;
                    }
                    if show_items {
                        let label = multi.then(|| labels[it.remote as usize].as_str());
                        let line = item_line(&it, label);
                        match &bar {
                            Some(pb) => pb.println(line),
                            None => {
                                let mut o = stdout.lock();
                                writeln!(o, "{line}")?;
                            }
                        }
                    }
                    if it.action == Action::Skip && !show_items && !collect {
                        let label = labels[it.remote as usize].as_str();
                        eprintln!(
                            "fleetsync: note: {label}: {} {}",
                            if it.path.is_empty() {
                                String::new()
                            } else {
                                escape_path(&it.path) + ":"
                            },
                            it.detail
                        );
                    }
                    if collect {
                        out.items.push(it);
                    }
                }
                if let Some(pb) = &bar {
                    pb.set_length(total_bytes);
                }
            }
            Msg::SyncProgress(p) => {
                done_bytes.insert(p.remote, p.done_bytes);
                if let Some(pb) = &bar {
                    pb.set_position(done_bytes.values().sum());
                    pb.set_message(format!("{}/{} files", p.done_files, p.total_files));
                }
            }
            Msg::RemoteResult(r) => {
                out.results.insert(r.remote, r);
            }
            Msg::SyncDone { ok, message } => {
                out.done_ok = ok;
                out.done_message = message;
                break;
            }
            Msg::Error { message, .. } => bail!("server error: {message}"),
            other => bail!("unexpected {} from the server", other.kind_name()),
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(out)
}

/// The two buffered halves of one connection as one stream, for the handshake.
struct ReadWrite<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R: std::io::Read, W> std::io::Read for ReadWrite<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for ReadWrite<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}
