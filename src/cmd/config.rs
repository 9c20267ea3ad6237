//! `--config FILE` and `--print-config` of the long-running subcommands (`agent`, `server`).
//!
//! Generic over the clap definitions, so that a flag added later is settable in the file
//! without more code: the file is a flat TOML table whose keys are the subcommand's long
//! flag names (`listen = "0.0.0.0:7070"`, `token-file = "/etc/fleetsync/token"`,
//! `no-fsync = true`, `verbose = 1`). Every argument the command line did not give (clap's
//! `value_source` is not the command line) is filled from the file by turning the key into
//! `--key=VALUE` before the command line's own arguments, and the whole is parsed again by
//! clap, so a file value goes through exactly the validation a flag does; the command line
//! wins (also over a setting that one of its flags excludes). Unknown keys are an error naming the key and the file; a value of the wrong type
//! names the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The `--config` and `--print-config` flags (flattened into a subcommand's `Args`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// Read settings from FILE (TOML; keys are the long flag names, e.g.
    /// `listen = "0.0.0.0:7070"`, `no-fsync = true`; relative paths are from the working
    /// directory); flags on the command line override it.
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub config: Option<PathBuf>,
    /// Print the effective settings (the --config file, then the command line) as TOML that
    /// --config accepts, and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The ids of [`ConfigArgs`]' own arguments (never settable from a file).
const OWN: [&str; 2] = ["config", "print_config"];

/// What [`parse`] found.
pub enum Parsed {
    /// Run the subcommand with these matches (of the whole command line).
    Run(ArgMatches),
    /// `--print-config`: print this text and exit 0.
    Print(String),
}

/// Parses the process's arguments with `cmd` (the whole CLI), applying the `--config` file
/// of a subcommand that has [`ConfigArgs`]. Usage errors (clap's) exit as clap does.
pub fn parse(cmd: Command) -> anyhow::Result<Parsed> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    parse_from(cmd, argv)
}

fn parse_from(cmd: Command, argv: Vec<OsString>) -> anyhow::Result<Parsed> {
    // First pass, with the subcommands' required arguments relaxed and errors ignored (what
    // is missing, or what another flag requires, may come from the file): which subcommand,
    // which file, and what the command line gave. Anything wrong on the command line itself
    // is left to the real parse below, which reports it as usual.
    let relaxed = relax(cmd.clone()).ignore_errors(true);
    let Ok(first) = relaxed.try_get_matches_from(&argv) else {
        return Ok(Parsed::Run(cmd.get_matches_from(argv)));
    };
    let Some((name, sub)) = first.subcommand() else {
        return Ok(Parsed::Run(cmd.get_matches_from(argv)));
    };
    let Some(sub_cmd) = cmd.find_subcommand(name).cloned() else {
        return Ok(Parsed::Run(cmd.get_matches_from(argv)));
    };
    let has_config = sub_cmd.get_arguments().any(|a| a.get_id() == "config");
    if !has_config {
        return Ok(Parsed::Run(cmd.get_matches_from(argv)));
    }
    let mut full = argv.clone();
    // The ids of the settings the file gave (and the command line did not), and the file.
    let mut from_file = (Vec::new(), PathBuf::new());
    if let Some(file) = sub.get_one::<PathBuf>("config") {
        let table = read_table(file)?;
        let (extra, applied) = file_args(&sub_cmd, sub, &table, file)?;
        from_file = (applied, file.clone());
        // Right after the subcommand's name, before the command line's own arguments.
        let at = argv
            .iter()
            .skip(1)
            .position(|a| a.to_str() == Some(name))
            .map_or(argv.len(), |i| i + 2);
        full.splice(at..at, extra);
    }
    let matches = cmd.get_matches_from(full);
    let (_, sub) = matches.subcommand().expect("the first pass found one");
    if sub.get_flag("print_config") {
        return Ok(Parsed::Print(effective_toml(
            &sub_cmd, sub, name, &from_file,
        )?));
    }
    Ok(Parsed::Run(matches))
}

/// `cmd` with no subcommand argument required.
fn relax(cmd: Command) -> Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    names.iter().fold(cmd, |cmd, n| {
        cmd.mut_subcommand(n, |s| s.mut_args(|a| a.required(false)))
    })
}

/// Reads `file` as one TOML table.
fn read_table(file: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--config: reading {}", file.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", file.display()))
}

/// The `--key=VALUE` arguments for the keys of `table` that the command line (`given`) did
/// not set, and the ids of the arguments they set.
fn file_args(
    cmd: &Command,
    given: &ArgMatches,
    table: &toml::Table,
    file: &Path,
) -> anyhow::Result<(Vec<OsString>, Vec<String>)> {
    let mut out = Vec::new();
    let mut applied = Vec::new();
    for (key, value) in table {
        let at = || format!("--config {}: key `{key}`", file.display());
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|a| !OWN.contains(&a.get_id().as_str()))
        else {
            let known: Vec<&str> = settable(cmd).filter_map(|a| a.get_long()).collect();
            bail!(
                "{}: unknown setting (the keys are the long flags of `fleetsync {}`: {})",
                at(),
                cmd.get_name(),
                known.join(", ")
            );
        };
        if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue; // the command line wins
        }
        // So does a flag of the command line that excludes this setting.
        let on_command_line = |a: &clap::Arg| {
            given.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine)
        };
        let excluded = cmd
            .get_arg_conflicts_with(arg)
            .into_iter()
            .any(on_command_line)
            || cmd
                .get_arguments()
                .filter(|a| on_command_line(a))
                .any(|a| cmd.get_arg_conflicts_with(a).contains(&arg));
        if excluded {
            continue;
        }
        applied.push(arg.get_id().to_string());
        let flag = format!("--{key}");
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match value {
                toml::Value::Boolean(b) => {
                    // A flag is on when given: `false` gives nothing for SetTrue.
                    if *b == matches!(arg.get_action(), ArgAction::SetTrue) {
                        out.push(OsString::from(&flag));
                    }
                }
                other => bail!("{}: expected true or false, found {}", at(), kind(other)),
            },
            ArgAction::Count => match value {
                toml::Value::Integer(n) if (0..=255).contains(n) => {
                    out.extend((0..*n).map(|_| OsString::from(&flag)))
                }
                toml::Value::Boolean(b) => out.extend(b.then(|| OsString::from(&flag))),
                other => bail!(
                    "{}: expected a count from 0 to 255 (or true/false), found {}",
                    at(),
                    kind(other)
                ),
            },
            ArgAction::Append => {
                let items: Vec<&toml::Value> = match value {
                    toml::Value::Array(a) => a.iter().collect(),
                    v => vec![v],
                };
                for v in items {
                    out.push(format!("{flag}={}", scalar(v).with_context(at)?).into());
                }
            }
            _ => out.push(format!("{flag}={}", scalar(value).with_context(at)?).into()),
        }
    }
    // Check each value as clap would, so that a bad one names the file and key.
    for a in &out {
        let s = a.to_string_lossy();
        if let Some((flag, v)) = s.split_once('=') {
            let arg = cmd
                .get_arguments()
                .find(|x| x.get_long() == flag.strip_prefix("--"))
                .expect("built above");
            // A bare copy of the argument: its parser, none of its relations to others.
            let long = arg.get_long().expect("found by it");
            let mut probe = Command::new("probe").no_binary_name(true).arg(
                clap::Arg::new("probe")
                    .long(long.to_owned())
                    .action(ArgAction::Append)
                    .value_parser(arg.get_value_parser().clone()),
            );
            if let Err(e) = probe.try_get_matches_from_mut([a]) {
                let msg = first_line(&e.to_string());
                let why = msg.split_once("': ").map_or(msg.as_str(), |(_, why)| why);
                bail!(
                    "--config {}: key `{}`: invalid value {v:?}: {why}",
                    file.display(),
                    &flag[2..],
                );
            }
        }
    }
    Ok((out, applied))
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_owned()
}

/// The arguments a file may set.
fn settable(cmd: &Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long().is_some()
            && !OWN.contains(&a.get_id().as_str())
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
    })
}

/// A TOML value as a flag's text: strings, integers and floats.
fn scalar(v: &toml::Value) -> anyhow::Result<String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => bail!("expected a string or a number, found {}", kind(other)),
    }
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// The effective settings of `fleetsync NAME` (`m`: its final matches) as TOML that
/// `--config` reads back to the same settings; settings without a value are comments, and
/// each setting says where it came from when not the command line (the ids `file_ids` of
/// the file `file`).
fn effective_toml(
    cmd: &Command,
    m: &ArgMatches,
    name: &str,
    (file_ids, file): &(Vec<String>, PathBuf),
) -> anyhow::Result<String> {
    let in_file = format!(" # from {}", file.display());
    let mut out = format!(
        "# fleetsync {name}: effective settings (defaults, then --config, then the command line)\n"
    );
    for arg in settable(cmd) {
        let id = arg.get_id().as_str();
        let key = arg.get_long().expect("settable args have one");
        let from = match m.value_source(id) {
            _ if file_ids.iter().any(|f| f == id) => in_file.as_str(),
            Some(ValueSource::CommandLine) => "",
            Some(ValueSource::DefaultValue) | None => " # default",
            Some(ValueSource::EnvVariable) => " # from the environment",
            Some(_) => "",
        };
        let line = match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => format!("{key} = {}", m.get_flag(id)),
            ArgAction::Count => format!("{key} = {}", m.get_count(id)),
            action => {
                let raw: Vec<String> = match m.get_raw(id) {
                    Some(vals) => vals
                        .map(|v| {
                            v.to_str().map(str::to_owned).with_context(|| {
                                format!("--print-config: the value of --{key} is not UTF-8")
                            })
                        })
                        .collect::<anyhow::Result<_>>()?,
                    None => Vec::new(),
                };
                if matches!(action, ArgAction::Append) {
                    let items: Vec<String> = raw.iter().map(|s| toml_scalar(s)).collect();
                    format!("{key} = [{}]", items.join(", "))
                } else if let Some(v) = raw.first() {
                    format!("{key} = {}", toml_scalar(v))
                } else {
                    out.push_str(&format!("# {key} = (not set)\n"));
                    continue;
                }
            }
        };
        out.push_str(&line);
        out.push_str(from);
        out.push('\n');
    }
    Ok(out)
}

/// A flag's text as a TOML value: an integer when it reads back as the same text, else a
/// string.
fn toml_scalar(s: &str) -> String {
    if s.parse::<i64>().is_ok_and(|n| n.to_string() == s) {
        s.to_owned()
    } else {
        toml::Value::String(s.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Subcommand)]
    enum Sub {
        Svc {
            #[arg(long)]
            listen: String,
            #[arg(long, default_value_t = 5)]
            timeout: u64,
            #[arg(long)]
            fast: bool,
            #[arg(short, long, action = ArgAction::Count)]
            verbose: u8,
            #[arg(long)]
            include: Vec<String>,
            #[arg(long, requires = "key")]
            cert: Option<String>,
            #[arg(long)]
            key: Option<String>,
            #[arg(long, conflicts_with = "cert")]
            plain: bool,
            #[command(flatten)]
            config: ConfigArgs,
        },
        Other {
            #[arg(long)]
            x: Option<String>,
        },
    }

    fn run(args: &[&str], file: &str) -> anyhow::Result<Parsed> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, file).unwrap();
        let mut argv: Vec<OsString> = vec!["t".into()];
        argv.extend(
            args.iter()
                .map(|a| a.replace("FILE", p.to_str().unwrap()).into()),
        );
        parse_from(Cli::command(), argv)
    }

    fn svc(p: Parsed) -> ArgMatches {
        let Parsed::Run(m) = p else { panic!("not run") };
        m.subcommand_matches("svc").unwrap().clone()
    }

    #[test]
    fn the_file_fills_what_the_command_line_does_not_give() {
        let file =
            "listen = \"a:1\"\ntimeout = 9\nfast = true\nverbose = 2\ninclude = [\"x\", \"y\"]\n";
        let m = svc(run(&["svc", "--config", "FILE"], file).unwrap());
        assert_eq!(m.get_one::<String>("listen").unwrap(), "a:1");
        assert_eq!(*m.get_one::<u64>("timeout").unwrap(), 9);
        assert!(m.get_flag("fast"));
        assert_eq!(m.get_count("verbose"), 2);
        let inc: Vec<&String> = m.get_many("include").unwrap().collect();
        assert_eq!(inc, ["x", "y"]);
    }

    #[test]
    fn the_command_line_wins() {
        let file = "listen = \"a:1\"\ntimeout = 9\n";
        let m = svc(run(&["svc", "--timeout", "3", "--config", "FILE"], file).unwrap());
        assert_eq!(*m.get_one::<u64>("timeout").unwrap(), 3);
        assert_eq!(m.get_one::<String>("listen").unwrap(), "a:1");
    }

    #[test]
    fn what_a_flag_requires_may_come_from_the_file() {
        let file = "listen = \"a:1\"\nkey = \"k.pem\"\n";
        let m = svc(run(&["svc", "--cert", "c.pem", "--config", "FILE"], file).unwrap());
        assert_eq!(m.get_one::<String>("cert").unwrap(), "c.pem");
        assert_eq!(m.get_one::<String>("key").unwrap(), "k.pem");
    }

    #[test]
    fn a_command_line_flag_excluding_a_setting_of_the_file_wins() {
        let file = "listen = \"a:1\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let m = svc(run(&["svc", "--plain", "--config", "FILE"], file).unwrap());
        assert!(m.get_flag("plain"));
        assert_eq!(m.get_one::<String>("cert"), None);
        let file = "listen = \"a:1\"\nplain = true\n";
        let m = svc(run(
            &["svc", "--cert", "c", "--key", "k", "--config", "FILE"],
            file,
        )
        .unwrap());
        assert!(!m.get_flag("plain"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key_and_file() {
        let e = run(&["svc", "--config", "FILE"], "listne = \"a\"\n")
            .err()
            .unwrap();
        let e = e.to_string();
        assert!(
            e.contains("`listne`") && e.contains("c.toml") && e.contains("unknown"),
            "{e}"
        );
        let e = run(&["svc", "--config", "FILE"], "listen = \"a\"\nfast = 1\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`fast`") && e.contains("true or false"), "{e}");
        let e = run(
            &["svc", "--config", "FILE"],
            "listen = \"a\"\ntimeout = \"soon\"\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("`timeout`") && e.contains("soon"), "{e}");
        let e = run(&["svc", "--config", "FILE"], "config = \"x\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`config`") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn print_config_reads_back_to_the_same_settings() {
        let file = "listen = \"a:1\"\nfast = true\ninclude = [\"x y\"]\n";
        let Parsed::Print(text) =
            run(&["svc", "--config", "FILE", "-v", "--print-config"], file).unwrap()
        else {
            panic!("not printed")
        };
        assert!(text.contains("listen = \"a:1\""), "{text}");
        assert!(text.contains("timeout = 5 # default"), "{text}");
        assert!(text.contains("verbose = 1\n"), "{text}");
        let again = svc(run(&["svc", "--config", "FILE"], &text).unwrap());
        assert_eq!(again.get_one::<String>("listen").unwrap(), "a:1");
        assert!(again.get_flag("fast"));
        assert_eq!(again.get_count("verbose"), 1);
        let inc: Vec<&String> = again.get_many("include").unwrap().collect();
        assert_eq!(inc, ["x y"]);
    }

    #[test]
    fn subcommands_without_config_parse_as_usual() {
        let Parsed::Run(m) = run(&["other", "--x", "1"], "").unwrap() else {
            panic!()
        };
        assert!(m.subcommand_matches("other").is_some());
    }
}
