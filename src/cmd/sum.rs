//! `fleetsync sum`: print or check checksums, a drop-in for `cksum`, `sum`,
//! `md5sum` and `sha*sum` (byte-identical output, same `--check`).

mod check;
pub(crate) mod format;
mod reporter;

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fleetsync_engine::{
    hash_file, hash_reader, hash_tree, AlgorithmInfo, Error, FileHash, HashOptions, Registry,
};
use rayon::prelude::*;

use super::hashargs::{self, parse_size, Algorithms, ReadArgs};
use super::jsonpath::with_path;
use format::{os_message, quote, write_line, DisplayName, LineOptions, LineStyle};
use reporter::{engine_error_message, Reporter};

const AFTER_HELP: &str = "\
Output formats (byte-identical to GNU coreutils):
  -a bsd      like `sum -r`:     CHECKSUM BLOCKS NAME   (1024-byte blocks)
  -a sysv     like `sum -s`:     CHECKSUM BLOCKS NAME   (512-byte blocks)
  -a cksum    like `cksum`:      CRC SIZE NAME
  -a md5, sha1, sha224, sha256, sha384, sha512
              like `md5sum`...:  HEX  NAME    (--tag: MD5 (NAME) = HEX)
  any other   HEX  NAME          (--tag: ALG (NAME) = HEX, ALG in upper case)
With no FILE, or when FILE is -, read standard input; `sum`/`cksum` formats then
print no name when no FILE was given, like GNU. Names with '\\', newline or
carriage return are escaped and the line starts with '\\', like md5sum.

Several algorithms (-a crc32,md5,sha256) read each file once and print one line
per algorithm per file, each in that algorithm's own format, algorithms in the
order given.

--check reads checksum lists (the FILE operands, or standard input) in md5sum's
untagged or tagged format, of any algorithm; the algorithm of an untagged line
comes from -a, else from its length (8 hex: crc32, 32: md5, 40: sha1,
56: sha224, 64: sha256, 96: sha384, 128: sha512). With -a cksum, bsd or sysv
the decimal lines of cksum/sum are accepted too.

--json prints one object per file and algorithm:
  {\"path\",\"size\",\"algorithm\",\"digest\" (hex),\"error\" (null or the message)}
A name that is not valid UTF-8 also gets \"path_hex\", its exact bytes in lowercase hex.

Exit status: 0 all good; 1 a file could not be read or a checksum did not
match (or, with --strict, a line was improperly formatted); 2 usage or other
errors.";

/// Arguments of `fleetsync sum`.
#[derive(clap::Args)]
#[command(
    after_help = AFTER_HELP,
    mut_arg("algorithms", |a| a.help("Checksum algorithm(s), comma-separated (default crc32; see --list)"))
)]
pub struct Args {
    #[command(flatten)]
    algorithms: Algorithms,
    /// BSD-style lines: `ALG (NAME) = HEX`.
    #[arg(long)]
    tag: bool,
    /// Mark files as binary in untagged lines (`HEX *NAME`), like md5sum -b.
    #[arg(short = 'b', long, overrides_with = "text")]
    binary: bool,
    /// Mark files as text in untagged lines (`HEX  NAME`, the default).
    #[arg(short = 't', long, overrides_with = "binary")]
    text: bool,
    /// Hash every regular file under each directory operand, in sorted path order.
    #[arg(short = 'r', long)]
    recursive: bool,
    #[command(flatten)]
    read: ReadArgs,
    /// One JSON object per line per file and algorithm.
    #[arg(long, conflicts_with = "check")]
    json: bool,
    /// Report on standard error which I/O backend read each file.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Read checksums from the FILEs and verify them.
    #[arg(short = 'c', long)]
    check: bool,
    /// With --check: don't print OK for each verified file.
    #[arg(long, requires = "check")]
    quiet: bool,
    /// With --check: print nothing; the exit status tells.
    #[arg(long, requires = "check")]
    status: bool,
    /// With --check: warn about improperly formatted lines.
    #[arg(short = 'w', long, requires = "check")]
    warn: bool,
    /// With --check: exit 1 on improperly formatted lines.
    #[arg(long, requires = "check")]
    strict: bool,
    /// With --check: don't fail or report for files that are missing.
    #[arg(long, requires = "check")]
    ignore_missing: bool,
    /// End each output line with NUL, not newline, and don't escape names.
    #[arg(short = 'z', long, conflicts_with_all = ["check", "json"])]
    zero: bool,
    /// List the algorithms and exit.
    #[arg(long)]
    list: bool,
    /// Tuning: bytes per parallel chunk and per read (engine default if unset).
    #[arg(long, value_name = "SIZE", hide = true, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Tuning: files above this size are hashed by several threads.
    #[arg(long, value_name = "SIZE", hide = true, value_parser = parse_size)]
    parallel_threshold: Option<u64>,
    /// Files to hash (or, with --check, checksum lists). `-` is standard input.
    #[arg(value_name = "FILE")]
    files: Vec<OsString>,
}

/// Runs `fleetsync sum`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let registry = Registry::with_builtins();
    if args.list {
        return Ok(list(&registry));
    }
    let mut algs = if args.algorithms.is_empty() {
        hashargs::resolve(&registry, &["crc32".to_owned()])?
    } else {
        args.algorithms.resolve(&registry)?
    };
    if args.check && args.algorithms.is_empty() {
        algs.clear();
    }
    let mut hash = args.read.hash_options()?;
    if let Some(c) = args.chunk_size {
        hash.chunk_size = usize::try_from(c.max(1)).unwrap_or(usize::MAX);
    }
    if let Some(t) = args.parallel_threshold {
        hash.parallel_threshold = t;
    }
    if args.read.jobs.is_some() {
        let pool = args.read.thread_pool()?;
        Ok(pool.install(|| run_in_pool(&args, &algs, &hash)))
    } else {
        Ok(run_in_pool(&args, &algs, &hash))
    }
}

fn run_in_pool(args: &Args, algs: &[AlgorithmInfo], hash: &HashOptions) -> u8 {
    let mut rep = Reporter::new();
    if args.check {
        let opts = check::CheckOptions {
            algorithms: algs,
            quiet: args.quiet,
            status: args.status,
            warn: args.warn,
            strict: args.strict,
            ignore_missing: args.ignore_missing,
            hash,
        };
        return check::run(&args.files, &opts, &mut rep);
    }
    let mut printer = Printer {
        args,
        algs,
        styles: algs
            .iter()
            .map(|a| LineStyle::for_algorithm(&a.name))
            .collect(),
        failed: false,
        line: Vec::with_capacity(256),
    };
    if args.files.is_empty() {
        let result = hash_reader(io::stdin().lock(), algs);
        printer.report(&mut rep, b"-", true, result);
        return u8::from(printer.failed);
    }
    // Consecutive plain files are hashed in parallel batches; output keeps operand order.
    let batch = 4 * rayon::current_num_threads().max(1);
    let mut pending: Vec<&OsString> = Vec::new();
    for file in &args.files {
        let path = Path::new(file);
        // Only -r needs to know about directories up front; without it, a
        // directory fails in the engine with EISDIR ("Is a directory"), as in GNU.
        let is_dir = args.recursive
            && file != "-"
            && std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
        if file == "-" || is_dir || pending.len() >= batch {
            printer.hash_batch(&mut rep, &pending, hash);
            pending.clear();
        }
        if file == "-" {
            let result = hash_reader(io::stdin().lock(), algs);
            printer.report(&mut rep, b"-", false, result);
        } else if is_dir {
            printer.hash_dir(&mut rep, path, hash);
        } else {
            pending.push(file);
        }
    }
    printer.hash_batch(&mut rep, &pending, hash);
    u8::from(printer.failed)
}

/// Hashes operands and prints their lines in operand order.
struct Printer<'a> {
    args: &'a Args,
    algs: &'a [AlgorithmInfo],
    /// The output format of each algorithm, parallel to `algs`.
    styles: Vec<LineStyle>,
    /// Some file could not be read (exit status 1).
    failed: bool,
    /// Scratch buffer for one file's lines.
    line: Vec<u8>,
}

impl Printer<'_> {
    fn hash_batch(&mut self, rep: &mut Reporter, files: &[&OsString], opts: &HashOptions) {
        let algs = self.algs;
        let results: Vec<Result<FileHash, Error>> = files
            .par_iter()
            .map(|f| hash_file(Path::new(f), algs, opts))
            .collect();
        for (file, result) in files.iter().zip(results) {
            self.report(rep, file.as_bytes(), false, result);
        }
    }

    fn hash_dir(&mut self, rep: &mut Reporter, root: &Path, opts: &HashOptions) {
        let tree = match hash_tree(root, self.algs, opts) {
            Ok(t) => t,
            Err(e) => {
                rep.error(&tree_error(root, &e));
                self.failed = true;
                return;
            }
        };
        for skipped in &tree.skipped {
            let path = entry_path(root, &skipped.path);
            rep.error(&format!(
                "skipping {} {}",
                skipped.reason,
                quote(path.as_os_str().as_bytes())
            ));
        }
        for entry in tree.entries {
            let path = entry_path(root, &entry.path);
            self.report(rep, path.as_os_str().as_bytes(), false, entry.result);
        }
    }

    fn report(
        &mut self,
        rep: &mut Reporter,
        name: &[u8],
        implicit_stdin: bool,
        result: Result<FileHash, Error>,
    ) {
        self.line.clear();
        match result {
            Ok(hash) => {
                if self.args.verbose {
                    rep.error(&format!("{}: read with {}", quote(name), hash.io));
                }
                let display = DisplayName {
                    bytes: name,
                    implicit_stdin,
                };
                for ((alg, style), digest) in self.algs.iter().zip(&self.styles).zip(&hash.digests)
                {
                    if self.args.json {
                        let v = with_path(
                            serde_json::json!({
                                "size": hash.size,
                                "algorithm": alg.name,
                                "digest": digest.to_hex(),
                                "error": null,
                            }),
                            name,
                        );
                        self.line.extend_from_slice(v.to_string().as_bytes());
                        self.line.push(b'\n');
                    } else {
                        write_line(
                            &mut self.line,
                            style,
                            LineOptions {
                                tag: self.args.tag,
                                zero: self.args.zero,
                                binary: self.args.binary,
                            },
                            &display,
                            hash.size,
                            digest,
                        );
                    }
                }
                rep.out(&self.line);
            }
            Err(e) => {
                self.failed = true;
                let msg = engine_error_message(&e);
                if self.args.json {
                    for alg in self.algs {
                        let v = with_path(
                            serde_json::json!({
                                "size": null,
                                "algorithm": alg.name,
                                "digest": null,
                                "error": msg,
                            }),
                            name,
                        );
                        self.line.extend_from_slice(v.to_string().as_bytes());
                        self.line.push(b'\n');
                    }
                    rep.out(&self.line);
                }
                rep.error(&format!("{}: {msg}", quote(name)));
            }
        }
    }
}

/// A tree entry's path as printed: under the operand, like `find DIR`.
fn entry_path(root: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || path.starts_with(root) {
        path.to_owned()
    } else {
        root.join(path)
    }
}

fn tree_error(root: &Path, e: &Error) -> String {
    match e {
        Error::Io {
            path: Some(p),
            source,
        } => format!(
            "{}: {}",
            quote(p.as_os_str().as_bytes()),
            os_message(source)
        ),
        other => format!(
            "{}: {}",
            quote(root.as_os_str().as_bytes()),
            engine_error_message(other)
        ),
    }
}

/// `--list`: every algorithm, whether one file can be hashed by several threads, and what it is.
fn list(registry: &Registry) -> u8 {
    let mut rep = Reporter::new();
    let width = registry
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let mut text = format!("{:<width$}  PARALLEL  DESCRIPTION\n", "ALGORITHM");
    for info in registry.iter() {
        text.push_str(&format!(
            "{:<width$}  {:<8}  {}\n",
            info.name,
            if info.combinable { "yes" } else { "no" },
            info.description
        ));
    }
    rep.out(text.as_bytes());
    0
}
