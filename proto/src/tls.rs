//! TLS 1.3 with mutual authentication by certificates of one fleet CA (`rustls`, `ring`).
//!
//! Every certificate carries its holder's role as a SAN URI `fleetsync:role:NAME`
//! (`agent`, `server` or `control`). [`Identity::load`] reads a directory holding
//! `ca.pem` (the fleet CA certificate), `cert.pem` (our chain) and `key.pem` (our key), as
//! `fleetsync cert issue` writes it. The configurations it builds speak TLS 1.3 only,
//! require a client certificate, verify the peer's chain against the fleet CA alone
//! (`rustls`' WebPKI verifiers: validity dates, key usage, signatures) and then check the
//! peer's role inside the verifier, so that a peer of the wrong role fails the handshake
//! with an alert, before any request:
//!
//! | side                       | accepts roles      |
//! |----------------------------|--------------------|
//! | agent listener             | `server`, `agent`  |
//! | server listener            | `control`          |
//! | server dialling an agent   | `agent`            |
//! | agent dialling an agent    | `agent`            |
//! | control client → server    | `server`           |
//!
//! A connector also checks that the listener's certificate names the host it dialled (a DNS
//! or IP SAN given at `cert issue --san`), see [`server_name`].
//!
//! [`Stream`] is the blocking connection of agents and the control client: plain TCP or
//! TLS, with `try_clone` so that one thread reads while another writes. Its TLS state sits
//! behind a mutex that is never held across a blocking socket call: the writer encrypts
//! under it into a buffer and writes that buffer outside it (socket writes are ordered by a
//! second mutex that only writers take), the reader reads raw bytes outside it and feeds
//! them to rustls under it. Two peers writing big data at each other cannot deadlock.
//! Event loops (the server) drive a [`rustls::Connection`] themselves with the
//! configurations from [`Identity`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::Role;

/// Prefix of the SAN URI that carries a certificate's role.
pub const ROLE_URI_PREFIX: &str = "fleetsync:role:";

/// File names inside a `--tls DIR`.
pub const CA_FILE: &str = "ca.pem";
/// Our certificate (chain) inside a `--tls DIR`.
pub const CERT_FILE: &str = "cert.pem";
/// Our private key inside a `--tls DIR`.
pub const KEY_FILE: &str = "key.pem";

/// How long a TLS listener waits for the first byte of a connector before deciding that
/// it is a plaintext fleetsync connector (which waits for `hello` and never speaks first)
/// and answering it, in plaintext, that TLS is required. A TLS client sends its
/// ClientHello at once.
pub const PLAINTEXT_PROBE: Duration = Duration::from_secs(3);

/// The message a TLS listener sends (as a plaintext `error` frame) to a plaintext connector.
pub const TLS_REQUIRED_MESSAGE: &str =
    "this listener requires TLS: give the connector --tls DIR (a certificate of the fleet CA)";

/// A TLS setup failure or a refused peer.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file of the `--tls` directory could not be read or parsed.
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// The certificates or key do not make a configuration.
    Config(String),
    /// The handshake failed or the peer was refused.
    Handshake(String),
    /// A socket operation failed.
    Io(io::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::File { path, why } => write!(f, "{}: {why}", path.display()),
            TlsError::Config(m) => write!(f, "TLS configuration: {m}"),
            TlsError::Handshake(m) => write!(f, "TLS: {m}"),
            TlsError::Io(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// The role a certificate carries in its SAN URI `fleetsync:role:NAME`.
pub fn cert_role(der: &[u8]) -> Result<Role, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                let role = match role {
                    "agent" => Role::Agent,
                    "server" => Role::Server,
                    "control" => Role::Control,
                    other => return Err(format!("unknown role '{other}' in the certificate")),
                };
                if found.is_some_and(|f| f != role) {
                    return Err("the certificate carries two roles".into());
                }
                found = Some(role);
            }
        }
    }
    found
        .ok_or_else(|| format!("the certificate carries no role (no SAN URI {ROLE_URI_PREFIX}...)"))
}

/// The name a connector checks the listener's certificate against, from the address it
/// dials (`host:port`, `[v6]:port`): an IP address must be an IP SAN, a host name a DNS SAN.
pub fn server_name(target: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match target.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => target,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Config(format!("'{host}' is not a host name or address: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Checks the role of a verified end-entity certificate.
fn check_role(end_entity: &CertificateDer<'_>, allowed: &[Role]) -> Result<Role, rustls::Error> {
    let role = cert_role(end_entity).map_err(role_error)?;
    if !allowed.contains(&role) {
        return Err(role_error(format!(
            "the peer's certificate has role {}, expected {}",
            role.name(),
            roles_text(allowed)
        )));
    }
    Ok(role)
}

#[derive(Debug)]
struct RoleError(String);

impl fmt::Display for RoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RoleError {}

fn role_error(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(RoleError(
        why,
    )))))
}

/// A listener's verifier of client certificates: the fleet CA's, then the role.
#[derive(Debug)]
struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<Role>,
}

impl ClientCertVerifier for RoleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_role(end_entity, &self.allowed)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A connector's verifier of the listener's certificate: the fleet CA's and the name
/// dialled, then the role.
#[derive(Debug)]
struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    allowed: Vec<Role>,
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_role(end_entity, &self.allowed)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Our certificate, key and the fleet CA: what every TLS configuration is built from.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    role: Role,
    dir: PathBuf,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

impl Identity {
    /// Reads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem` (as `fleetsync cert issue`
    /// writes them), and checks that the certificate carries a role and that the key is
    /// not readable by group or others.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let read_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| file_error(path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_error(path, e))?;
            if certs.is_empty() {
                return Err(file_error(path, "no certificate in it"));
            }
            Ok(certs)
        };
        let ca = read_certs(&ca_path)?;
        let chain = read_certs(&cert_path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(&key_path).map_err(|e| file_error(&key_path, e))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(file_error(
                    &key_path,
                    format!(
                        "the private key is open to group or others (mode {:o}): chmod 600 it",
                        meta.permissions().mode() & 0o777
                    ),
                ));
            }
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_error(&key_path, e))?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| file_error(&ca_path, format!("not a usable CA certificate: {e}")))?;
        }
        let role = cert_role(&chain[0]).map_err(|e| file_error(&cert_path, e))?;
        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key,
            role,
            dir: dir.to_path_buf(),
        })
    }

    /// The role our own certificate carries.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our own (end-entity) certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Our key as a signer (the server signs tickets with it, see [`crate::ticket`]).
    pub fn signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
        provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("key: {e}")))
    }

    /// A listener's configuration: TLS 1.3, a client certificate of the fleet CA required,
    /// with one of the roles `accept`.
    pub fn server_config(&self, accept: &[Role]) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(RoleClientVerifier {
            inner,
            allowed: accept.to_vec(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        // No session tickets: nothing is resumed, and a listener then never writes on its
        // own after the handshake (see `Stream`).
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// A connector's configuration: TLS 1.3, our certificate as client certificate, the
    /// listener's certificate of the fleet CA, naming the host dialled, with one of the
    /// roles `expect`.
    pub fn client_config(&self, expect: &[Role]) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(RoleServerVerifier {
            inner,
            provider: provider.clone(),
            allowed: expect.to_vec(),
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// The peer's end-entity certificate of a finished handshake.
pub fn peer_cert(conn: &rustls::CommonState) -> Option<CertificateDer<'static>> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}

/// The role of the peer of a finished handshake (its certificate was verified, role
/// included, by the configurations of [`Identity`]).
pub fn peer_role(conn: &rustls::CommonState) -> Option<Role> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_role(c).ok())
}

/// Words for a handshake failure: what rustls said, and what it likely means.
pub fn explain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, Error as E, InvalidMessage};
    match e {
        E::InvalidMessage(InvalidMessage::InvalidContentType)
        | E::InvalidMessage(InvalidMessage::UnknownProtocolVersion) => {
            "the peer does not speak TLS (a plaintext listener? start it with --tls DIR)".into()
        }
        E::AlertReceived(a) => {
            let what = match a {
                A::UnknownCA => "it does not trust our CA (another fleet CA?)",
                A::DecryptError => {
                    "it does not trust our CA (a signature did not verify: another fleet CA \
                     of the same name?)"
                }
                A::CertificateExpired => "our certificate has expired",
                A::BadCertificate | A::AccessDenied | A::CertificateUnknown => {
                    "it refused our certificate (wrong role or name?)"
                }
                A::CertificateRequired => "it requires a client certificate",
                _ => "it refused the handshake",
            };
            format!("the peer refused us: {what} (alert {a:?})")
        }
        E::InvalidCertificate(CertificateError::Other(o)) => {
            format!("refused the peer's certificate: {}", o.0)
        }
        E::InvalidCertificate(c) => {
            let what = match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    "not issued by our fleet CA"
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "not valid yet"
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "does not name the address dialled (cert issue --san)"
                }
                _ => "invalid",
            };
            format!("refused the peer's certificate: {what} ({c:?})")
        }
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        other => other.to_string(),
    }
}

fn io_explain(e: io::Error) -> TlsError {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return TlsError::Handshake(explain(inner));
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            TlsError::Handshake("the peer did not finish the handshake in time".into())
        }
        io::ErrorKind::UnexpectedEof => TlsError::Handshake(
            "the peer closed the connection during the handshake (it refused us?)".into(),
        ),
        _ => TlsError::Io(e),
    }
}

/// Runs a whole handshake on a blocking socket with a deadline.
fn handshake(
    conn: &mut rustls::Connection,
    sock: &mut TcpStream,
    deadline: Instant,
) -> Result<(), TlsError> {
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Handshake(
                "the peer did not finish the handshake in time".into(),
            ));
        }
        sock.set_read_timeout(Some(left)).map_err(TlsError::Io)?;
        sock.set_write_timeout(Some(left)).map_err(TlsError::Io)?;
        let (rd, _) = conn.complete_io(sock).map_err(io_explain)?;
        if rd == 0 && conn.is_handshaking() && !conn.wants_write() {
            // complete_io read nothing: the peer closed.
            return Err(TlsError::Handshake(
                "the peer closed the connection during the handshake (it refused us?)".into(),
            ));
        }
    }
    sock.set_read_timeout(None).map_err(TlsError::Io)?;
    sock.set_write_timeout(None).map_err(TlsError::Io)?;
    Ok(())
}

/// A blocking connection: plain TCP, or TLS over it. Clones ([`Stream::try_clone`]) share
/// the connection: one may read while another writes (one reader and one writer at a time).
pub struct Stream {
    inner: Inner,
    /// This handle's raw read buffer (TLS).
    rbuf: Vec<u8>,
}

enum Inner {
    Plain(TcpStream),
    Tls(Arc<TlsShared>),
}

struct TlsShared {
    /// Read outside every lock; written only under `out`.
    sock: TcpStream,
    state: Mutex<TlsState>,
    /// Orders socket writes; holds the buffer of encrypted bytes being written.
    out: Mutex<Vec<u8>>,
    peer_role: Role,
}

struct TlsState {
    conn: rustls::Connection,
    /// Bytes read from the socket that rustls has not taken yet.
    raw: Vec<u8>,
    /// How much of `raw` rustls has taken (rustls takes a record or so per call: moving the
    /// rest down each time would copy the buffer many times over).
    raw_pos: usize,
}

impl TlsState {
    /// Moves every encrypted byte rustls has to send into `out`.
    fn take_output(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(out)?;
        }
        Ok(())
    }
}

impl Drop for TlsShared {
    fn drop(&mut self) {
        // The last handle: say goodbye (best effort, never blocking long).
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.conn.send_close_notify();
        let mut out = Vec::new();
        if st.take_output(&mut out).is_ok() {
            let _ = self.sock.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = (&self.sock).write_all(&out);
        }
    }
}

impl Stream {
    /// A plaintext connection.
    pub fn plain(sock: TcpStream) -> Stream {
        Stream {
            inner: Inner::Plain(sock),
            rbuf: Vec::new(),
        }
    }

    /// Runs the listener side of the TLS handshake on `sock` (at most `timeout`); the peer
    /// must present a certificate of one of the roles `config` accepts. A connector that
    /// sends nothing for [`PLAINTEXT_PROBE`] is taken for a plaintext fleetsync connector
    /// and is told, in a plaintext `error` frame, that TLS is required. On error the
    /// caller just drops the socket.
    pub fn accept(
        mut sock: TcpStream,
        config: &Arc<ServerConfig>,
        timeout: Duration,
    ) -> Result<Stream, TlsError> {
        let deadline = Instant::now() + timeout;
        sock.set_read_timeout(Some(PLAINTEXT_PROBE.min(timeout)))
            .map_err(TlsError::Io)?;
        let mut first = [0u8; 1];
        match sock.peek(&mut first) {
            Ok(0) => {
                return Err(TlsError::Handshake(
                    "the peer closed the connection before the handshake".into(),
                ))
            }
            Ok(_) if first[0] != 0x16 => {
                return Err(TlsError::Handshake(format!(
                    "the peer does not speak TLS (first byte {:#04x})",
                    first[0]
                )))
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let msg = crate::Msg::Error {
                    request_id: 0,
                    message: TLS_REQUIRED_MESSAGE.into(),
                };
                let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = crate::frame::write_frame(&mut sock, &msg.encode());
                return Err(TlsError::Handshake(
                    "a plaintext connector (it sent nothing, waiting for hello): told it that \
                     TLS is required"
                        .into(),
                ));
            }
            Err(e) => return Err(TlsError::Io(e)),
        }
        let server = rustls::ServerConnection::new(config.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut conn = rustls::Connection::Server(server);
        handshake(&mut conn, &mut sock, deadline)?;
        Self::wrap(sock, conn)
    }

    /// Runs the connector side of the TLS handshake on `sock` (at most `timeout`): the
    /// listener's certificate must be of the fleet CA, name `name` and carry one of the
    /// roles `config` expects.
    pub fn connect(
        mut sock: TcpStream,
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> Result<Stream, TlsError> {
        let deadline = Instant::now() + timeout;
        let client = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut conn = rustls::Connection::Client(client);
        handshake(&mut conn, &mut sock, deadline)?;
        Self::wrap(sock, conn)
    }

    fn wrap(sock: TcpStream, mut conn: rustls::Connection) -> Result<Stream, TlsError> {
        let peer_role = peer_role(&conn)
            .ok_or_else(|| TlsError::Handshake("the peer's certificate carries no role".into()))?;
        // Writers hand over whole buffers (1 MiB) at once; see `Write for Stream`.
        conn.set_buffer_limit(None);
        Ok(Stream {
            inner: Inner::Tls(Arc::new(TlsShared {
                sock,
                state: Mutex::new(TlsState {
                    conn,
                    raw: Vec::new(),
                    raw_pos: 0,
                }),
                out: Mutex::new(Vec::new()),
                peer_role,
            })),
            rbuf: Vec::new(),
        })
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        let inner = match &self.inner {
            Inner::Plain(s) => Inner::Plain(s.try_clone()?),
            Inner::Tls(t) => Inner::Tls(t.clone()),
        };
        Ok(Stream {
            inner,
            rbuf: Vec::new(),
        })
    }

    /// The TCP connection under it: shutting it down (from another thread) ends every
    /// read and write of the stream at once.
    pub fn tcp(&self) -> &TcpStream {
        self.sock()
    }

    fn sock(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(t) => &t.sock,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// The peer's certificate (TLS only).
    pub fn peer_cert(&self) -> Option<CertificateDer<'static>> {
        match &self.inner {
            Inner::Plain(_) => None,
            Inner::Tls(t) => t.state.lock().ok().and_then(|st| peer_cert(&st.conn)),
        }
    }

    /// The role of the peer's certificate (TLS only).
    pub fn peer_role(&self) -> Option<Role> {
        match &self.inner {
            Inner::Plain(_) => None,
            Inner::Tls(t) => Some(t.peer_role),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock().peer_addr()
    }

    /// As [`TcpStream::set_read_timeout`].
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.sock().set_read_timeout(d)
    }

    /// As [`TcpStream::set_nodelay`].
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock().set_nodelay(on)
    }

    /// Shuts the connection down; with TLS, sends `close_notify` first when no write is
    /// under way (best effort: this may be called to unblock another thread).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let Inner::Tls(t) = &self.inner {
            if how != Shutdown::Read {
                if let Ok(mut out) = t.out.try_lock() {
                    out.clear();
                    if let Ok(mut st) = t.state.lock() {
                        st.conn.send_close_notify();
                        let _ = st.take_output(&mut out);
                    }
                    let _ = t.sock.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = (&t.sock).write_all(&out);
                    let _ = t.sock.set_write_timeout(None);
                }
            }
        }
        self.sock().shutdown(how)
    }
}

fn lock_poisoned() -> io::Error {
    io::Error::other("TLS state poisoned")
}

/// Writes what rustls has to send (an alert, a key update) if no writer is busy; a busy
/// writer sends it after its own bytes.
fn send_pending(t: &TlsShared) {
    if let Ok(mut out) = t.out.try_lock() {
        out.clear();
        if let Ok(mut st) = t.state.lock() {
            let _ = st.take_output(&mut out);
        }
        let _ = (&t.sock).write_all(&out);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match &mut self.inner {
            Inner::Plain(s) => return s.read(buf),
            Inner::Tls(t) => t.clone(),
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut failed = None;
            let pending = {
                let mut guard = t.state.lock().map_err(|_| lock_poisoned())?;
                let st = &mut *guard;
                loop {
                    match st.conn.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // A TCP close without close_notify ends the stream as a plain close
                        // does: the framing above tells a cut frame from a whole one.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    if st.raw_pos == st.raw.len() {
                        st.raw.clear();
                        st.raw_pos = 0;
                        break;
                    }
                    let mut slice = &st.raw[st.raw_pos..];
                    let n = st.conn.read_tls(&mut slice)?;
                    st.raw_pos += n;
                    if let Err(e) = st.conn.process_new_packets() {
                        // In TLS 1.3 a listener's verdict on our certificate comes after
                        // our side of the handshake: say what it means here too.
                        failed = Some(format!("TLS: {}", explain(&e)));
                        break;
                    }
                    if n == 0 {
                        break;
                    }
                }
                st.conn.wants_write()
            };
            if pending {
                // An alert (or a key update) for the peer.
                send_pending(&t);
            }
            if let Some(e) = failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.rbuf.is_empty() {
                self.rbuf = vec![0u8; 256 * 1024];
            }
            // Outside every lock: a writer may be blocked on this connection meanwhile.
            let n = match (&t.sock).read(&mut self.rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut st = t.state.lock().map_err(|_| lock_poisoned())?;
            if n == 0 {
                // Tell rustls the stream ended; its reader then says how.
                st.conn.read_tls(&mut io::empty())?;
                if st.raw_pos == st.raw.len() {
                    if let Err(e) = st.conn.process_new_packets() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("TLS: {}", explain(&e)),
                        ));
                    }
                    return match st.conn.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        Err(e) => Err(e),
                    };
                }
            } else {
                st.raw.extend_from_slice(&self.rbuf[..n]);
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = match &mut self.inner {
            Inner::Plain(s) => return s.write(buf),
            Inner::Tls(t) => t.clone(),
        };
        let mut out = t.out.lock().map_err(|_| lock_poisoned())?;
        let mut written = None;
        loop {
            out.clear();
            {
                let mut st = t.state.lock().map_err(|_| lock_poisoned())?;
                if written.is_none() {
                    // No buffer limit: rustls takes (encrypts) the whole buffer.
                    written = Some(st.conn.writer().write(buf)?);
                }
                st.take_output(&mut out)?;
            }
            if out.is_empty() {
                return Ok(written.unwrap_or(0));
            }
            // Outside the state lock: the reader keeps feeding rustls meanwhile.
            (&t.sock).write_all(&out)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Tls(_) => self.write(&[]).map(|_| ()),
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("tls", &self.is_tls())
            .field("peer", &self.peer_addr().ok())
            .finish()
    }
}
