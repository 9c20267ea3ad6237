//! `fleetsync cert`: the fleet CA and the certificates of agents, servers and control
//! clients (`rcgen`). Each certificate carries its role as a SAN URI
//! `fleetsync:role:NAME` (see `fleetsync_proto::tls`), plus the host names and addresses
//! its holder listens on (`--san`), which connectors check.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetsync_proto::tls::{CA_FILE, CERT_FILE, KEY_FILE, ROLE_URI_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The CA's private key inside a CA directory (its certificate is `ca.pem`).
const CA_KEY_FILE: &str = "ca.key";

/// Arguments of `fleetsync cert`.
#[derive(clap::Args)]
#[command(after_help = "\
A fleet: one CA (`cert init`), then one certificate per agent, server and control client \
(`cert issue`), each in a directory of its own holding ca.pem, cert.pem and key.pem: give \
that directory to `--tls DIR` of `agent`, `server` and `sync --server`.

Keep the CA directory (its ca.key) off the fleet: only `cert issue` needs it.

Exit codes: 0 done, 2 usage error or a file could not be written (nothing is overwritten).")]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Make a fleet CA: DIR/ca.key (mode 600) and DIR/ca.pem (self-signed).
    Init {
        /// Where to write it (created if missing; must not hold a CA already).
        dir: PathBuf,
        /// The CA's common name [default: "fleetsync fleet CA" and a random suffix, so
        /// that two fleets' CAs never share a name].
        #[arg(long)]
        name: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a key and a certificate signed by the fleet CA: OUT/cert.pem, OUT/key.pem (mode
    /// 600) and a copy of the CA certificate, OUT/ca.pem.
    Issue {
        /// The CA directory (`cert init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// What the holder is: `agent` (listens for the server and for other agents, and
        /// dials agents), `server` (listens for control clients, dials agents) or `control`
        /// (`sync --server`, `verify --server`).
        #[arg(long, value_parser = ["agent", "server", "control"])]
        role: String,
        /// The holder's name (the certificate's common name; also its first SAN when it is
        /// a host name or an IP address and no --san is given).
        name: String,
        /// A host name or IP address the holder is reached at (repeatable): a connector
        /// checks the address it dials against these (an IP address against IP SANs).
        #[arg(long, value_name = "HOST")]
        san: Vec<String>,
        /// Output directory [default: ./NAME].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

/// Runs `fleetsync cert`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Init { dir, name, days } => {
            let name = name.unwrap_or_else(|| {
                let n = fleetsync_proto::auth::nonce();
                format!(
                    "fleetsync fleet CA {:02x}{:02x}{:02x}{:02x}",
                    n[0], n[1], n[2], n[3]
                )
            });
            init(&dir, &name, days)
        }
        Command::Issue {
            ca,
            role,
            name,
            san,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(&name));
            issue(&ca, &role, &name, &san, &out, days)
        }
    }?;
    Ok(0)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks slightly behind ours.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn serial() -> SerialNumber {
    let mut b = fleetsync_proto::auth::nonce()[..16].to_vec();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

fn init(dir: &Path, name: &str, days: u32) -> anyhow::Result<()> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_FILE);
    for p in [&key_path, &cert_path] {
        if p.exists() {
            bail!("{} exists already: not overwriting a CA", p.display());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    println!(
        "fleet CA: {} (certificate), {} (private key: keep it off the fleet)",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

fn issue(
    ca: &Path,
    role: &str,
    name: &str,
    san: &[String],
    out: &Path,
    days: u32,
) -> anyhow::Result<()> {
    let ca_cert_path = ca.join(CA_FILE);
    let ca_key_path = ca.join(CA_KEY_FILE);
    let ca_pem = std::fs::read_to_string(&ca_cert_path)
        .with_context(|| format!("reading the CA certificate {}", ca_cert_path.display()))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("reading the CA key {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a private key", ca_key_path.display()))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .with_context(|| format!("{}: not a CA certificate", ca_cert_path.display()))?;
    // rcgen signs with a certificate object: the CA's own, re-made from its parameters and
    // key (same subject, same key, so the same issuer for verifiers).
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("the CA key does not fit the CA certificate")?;

    for f in [CERT_FILE, KEY_FILE, CA_FILE] {
        let p = out.join(f);
        if p.exists() {
            bail!("{} exists already: not overwriting it", p.display());
        }
    }

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let mut sans = vec![SanType::URI(
        format!("{ROLE_URI_PREFIX}{role}")
            .try_into()
            .context("role URI")?,
    )];
    let hosts: Vec<&str> = if san.is_empty() {
        // The name itself, when it can be dialled.
        let usable = name.parse::<IpAddr>().is_ok()
            || rcgen::Ia5String::try_from(name.to_owned()).is_ok_and(|_| valid_dns(name));
        if usable {
            vec![name]
        } else {
            Vec::new()
        }
    } else {
        san.iter().map(String::as_str).collect()
    };
    for h in &hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => {
                if !valid_dns(h) {
                    bail!("--san {h}: neither an IP address nor a host name");
                }
                sans.push(SanType::DnsName(
                    h.to_string()
                        .try_into()
                        .with_context(|| format!("--san {h}"))?,
                ));
            }
        }
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Agents and servers both listen and dial; control clients only dial, but the usage is
    // what the role permits, not what the EKU says.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate().context("generating the key")?;
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .context("signing the certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_new(&out.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    write_new(&out.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    println!(
        "{role} certificate for {name} (SAN: {}): {} (give --tls {})",
        if hosts.is_empty() {
            "no host".to_string()
        } else {
            hosts.join(", ")
        },
        out.display(),
        out.display()
    );
    Ok(())
}

/// A DNS name as certificates carry it: labels of letters, digits and hyphens.
fn valid_dns(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Writes a new file with `mode` (never overwriting).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
