#!/usr/bin/env bash
# CI check of the Debian package: builds it (packaging/build-deb.sh, dev profile unless
# told otherwise), then checks with dpkg-deb that it holds the binary, both systemd units,
# the example settings (as conffiles), a man page per subcommand and the completions, and
# that the packaged binary runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# What building and checking a package takes: dpkg-shlibdeps (the package's Depends) and
# dpkg-deb, and cargo-deb (~2-3 min to install, once per machine).
if ! { command -v dpkg-shlibdeps && command -v dpkg-deb; } >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dpkg-dev
fi
cargo install --list | grep -q '^cargo-deb v3.8.0' || cargo install --locked --quiet cargo-deb --version =3.8.0

bash packaging/build-deb.sh "${1:-dev}"
deb=$(ls -t target/debian/fleetsync_*.deb | head -1)
contents=$(dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's#^\./#/#')

fail=0
need() {
  if ! grep -qx "$1" <<<"$contents"; then
    echo "check-deb: $deb lacks $1" >&2
    fail=1
  fi
}
need /usr/bin/fleetsync
need /usr/lib/systemd/system/fleetsync-agent.service
need /usr/lib/systemd/system/fleetsync-server.service
need /etc/fleetsync/agent.toml
need /etc/fleetsync/server.toml
need /usr/share/bash-completion/completions/fleetsync
need /usr/share/zsh/vendor-completions/_fleetsync
need /usr/share/fish/vendor_completions.d/fleetsync.fish
need /usr/share/man/man1/fleetsync.1.gz
# One page per subcommand, as the binary lists them.
for sub in $(target/packaging/bin/fleetsync --help | sed -n '/^Commands:/,/^$/p' | awk 'NR>1 && NF {print $1}'); do
  need "/usr/share/man/man1/fleetsync-$sub.1.gz"
done
conffiles=$(dpkg-deb -I "$deb" conffiles)
for f in /etc/fleetsync/agent.toml /etc/fleetsync/server.toml; do
  grep -qx "$f" <<<"$conffiles" || { echo "check-deb: $f is not a conffile" >&2; fail=1; }
done

# The packaged binary runs, and reads the packaged settings.
x=$(mktemp -d)
trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$deb" "$x"
"$x/usr/bin/fleetsync" --version
"$x/usr/bin/fleetsync" agent --config "$x/etc/fleetsync/agent.toml" --print-config >/dev/null
"$x/usr/bin/fleetsync" server --config "$x/etc/fleetsync/server.toml" --print-config >/dev/null

[ "$fail" -eq 0 ] || exit 1
echo "check-deb: $deb ok ($(wc -l <<<"$contents") entries)"
