//! `fleetsync completions SHELL`: the shell completion script, generated from the clap
//! definitions (`clap_complete`).

use clap_complete::Shell;

/// Arguments of `fleetsync completions`.
#[derive(clap::Args)]
#[command(after_help = "\
Install, e.g.: `fleetsync completions bash > /etc/bash_completion.d/fleetsync`, \
`fleetsync completions zsh > /usr/share/zsh/vendor-completions/_fleetsync`, \
`fleetsync completions fish > ~/.config/fish/completions/fleetsync.fish`.

Exit codes: 0 written, 2 usage error or write error.")]
pub struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

/// Writes the script for `args.shell` of `cmd` (the whole CLI) on stdout.
pub fn run(args: Args, mut cmd: clap::Command) -> anyhow::Result<u8> {
    let name = cmd.get_name().to_owned();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, name, &mut out);
    Ok(0)
}
