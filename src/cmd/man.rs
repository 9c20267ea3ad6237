//! `fleetsync man DIR`: man pages generated from the clap definitions (`clap_mangen`):
//! `fleetsync.1` and one `fleetsync-SUBCOMMAND.1` per subcommand.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Arguments of `fleetsync man`.
#[derive(clap::Args)]
#[command(after_help = "\
Read one with `man -l DIR/fleetsync-sync.1`; install into /usr/share/man/man1.

Exit codes: 0 written, 2 usage error or write error.")]
pub struct Args {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR", value_hint = clap::ValueHint::DirPath)]
    dir: PathBuf,
}

/// Writes the pages of `cmd` (the whole CLI) into `args.dir`; prints each path written.
pub fn run(args: Args, cmd: clap::Command) -> anyhow::Result<u8> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    write_page(&args.dir, cmd.get_name(), cmd.clone())?;
    for sub in cmd.get_subcommands() {
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        // The page's title and usage name the whole command line (`fleetsync-sync` is
        // `fleetsync sync`).
        let bin = format!("{} {}", cmd.get_name(), sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(bin)
            .version(cmd.get_version().unwrap_or_default().to_owned());
        write_page(&args.dir, &name, page)?;
    }
    Ok(0)
}

fn write_page(dir: &Path, name: &str, cmd: clap::Command) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut buf)
        .with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
