#!/usr/bin/env bash
# Regenerates proto/src/fleetsync_capnp.rs from proto/schema/fleetsync.capnp.
#
# Needs the Cap'n Proto compiler (`capnp`, Debian package `capnproto`) and the
# Rust plugin `capnpc-rust`, installed here on demand with the same minor
# version as the `capnp` runtime crate. A normal build needs neither: the
# generated file is checked in.
#
# Usage: proto/regen.sh [OUT_DIR]   (default: proto/src)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/src}"
CAPNPC_VERSION="0.21.4"

command -v capnp >/dev/null 2>&1 || { echo "regen.sh: 'capnp' not found (apt-get install capnproto)" >&2; exit 3; }
if ! grep -q "capnpc $CAPNPC_VERSION" "$HOME/.cargo/.crates.toml" 2>/dev/null; then
  cargo install capnpc --version "=$CAPNPC_VERSION" --locked >&2
fi
export PATH="$HOME/.cargo/bin:$PATH"

mkdir -p "$out"
capnp compile -orust:"$out" --src-prefix="$here/schema" "$here/schema/fleetsync.capnp"
rustfmt --edition 2021 "$out/fleetsync_capnp.rs"
