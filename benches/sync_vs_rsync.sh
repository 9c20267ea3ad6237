#!/usr/bin/env bash
# Side-by-side benchmark of `fleetsync sync` (embedded mode) against rsync.
#
#   benches/sync_vs_rsync.sh [WORKDIR]
#
# 1. Initial copy of a FILES-file tree (default 20,000; sizes log-uniform in
#    1 KiB..1 MiB, mean ~150 KiB) to 2 empty remotes, vs `rsync -a` to each.
# 2. No-change re-sync with checksums, vs `rsync -ac` to each.
# Prints the times and the ratios. Page cache is warm for both tools (the
# tree is written first, then read by both). fleetsync runs with its default
# fsync of every received file and, separately, with --no-fsync (rsync does
# not fsync by default).
#
# 3. With SERVER=1 (the default), the initial copy again in --server mode: an agent per tree and
#    a server as separate processes over loopback, once with the token (plaintext) and once
#    with TLS and fleet certificates (--tls), each to 2 empty remotes, against the same
#    `rsync -a` figure.
#
# Environment: FILES (default 20000), SEED (default 1), ROUNDS (re-sync, default 3), FLEETSYNC (binary,
# default target/release/fleetsync; built if missing), SERVER (default 1), KEEP=1 keeps WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-20000}
SEED=${SEED:-1}
BIN=${FLEETSYNC:-target/release/fleetsync}
[ -x "$BIN" ] || cargo build --release -p fleetsync >&2
WORK=${1:-$(mktemp -d /tmp/fleetsync-bench.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ ! -f "$WORK/daemons.pid" ] || while read -r p; do kill "$p" 2>/dev/null || true; done < "$WORK/daemons.pid"
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
M=$WORK/master

if [ ! -d "$M" ]; then
  echo "generating $FILES files in $M ..." >&2
  python3 - "$M" "$FILES" "$SEED" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
blob = os.urandom(2 << 20)
total = 0
for i in range(n):
    d = os.path.join(root, f"d{i % 50:02d}", f"s{(i // 50) % 20:02d}")
    os.makedirs(d, exist_ok=True)
    size = int(1024 * (1024 ** rng.random()))  # log-uniform 1 KiB .. 1 MiB
    off = rng.randrange(0, len(blob) - size)
    with open(os.path.join(d, f"f{i:06d}.dat"), "wb") as f:
        f.write(blob[off:off + size])
    total += size
print(f"{n} files, {total / 2**20:.0f} MiB", file=sys.stderr)
PY
fi
du -sh "$M" >&2
cat $(find "$M" -type f) > /dev/null  # warm the page cache

t() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
fresh() { rm -rf "$WORK/$1" "$WORK/$2"; mkdir -p "$WORK/$1" "$WORK/$2"; sync; }

fresh f1 f2
fs_init=$(t "$BIN" sync "$M" "$WORK/f1" "$WORK/f2")
fresh n1 n2
fs_init_nofsync=$(t "$BIN" sync --no-fsync "$M" "$WORK/n1" "$WORK/n2")
# Referee now, then drop these two copies: the re-sync below should find the three trees it
# compares (and rsync's) in the page cache, not compete with 2 more trees for it.
for r in n1 n2; do
  d=$(rsync -aHc -n -i --delete "$M/" "$WORK/$r/")
  [ -z "$d" ] || { echo "remote $r differs:"; echo "$d" | head; exit 1; }
done
rm -rf "$WORK/n1" "$WORK/n2"
fresh r1 r2
rs_init=$(t bash -c "rsync -a '$M/' '$WORK/r1/' && rsync -a '$M/' '$WORK/r2/'")

# Re-sync: alternate the two tools, best of ROUNDS each (load spikes hit both).
min() { echo "$1 $2" | awk '{print ($1 < $2) ? $1 : $2}'; }
fs_resync=999999; fs_resync_nc=999999; rs_resync=999999
for _ in $(seq "${ROUNDS:-3}"); do
  fs_resync=$(min "$fs_resync" "$(t "$BIN" sync "$M" "$WORK/f1" "$WORK/f2")")
  fs_resync_nc=$(min "$fs_resync_nc" "$(t "$BIN" sync --no-checksum-cache "$M" "$WORK/f1" "$WORK/f2")")
  rs_resync=$(min "$rs_resync" "$(t bash -c "rsync -ac '$M/' '$WORK/r1/' && rsync -ac '$M/' '$WORK/r2/'")")
done

# --server mode, plaintext (token) and TLS: daemons as a deployment runs them.
if [ "${SERVER:-1}" = 1 ]; then
  rm -f "$WORK/f1"/.fleetsync* 2>/dev/null || true
  P=$WORK/pki
  rm -rf "$P" && mkdir -p "$P" "$WORK/home"
  export HOME=$WORK/home XDG_STATE_HOME=$WORK/home/state XDG_CACHE_HOME=$WORK/home/cache
  unset FLEETSYNC_TOKEN
  "$BIN" cert init "$P/ca" > /dev/null
  for a in master s1 s2; do
    "$BIN" cert issue --ca "$P/ca" --role agent --san 127.0.0.1 --out "$P/$a" "$a" > /dev/null
  done
  "$BIN" cert issue --ca "$P/ca" --role server --san 127.0.0.1 --out "$P/server" server > /dev/null
  "$BIN" cert issue --ca "$P/ca" --role control --out "$P/control" control > /dev/null
  head -c 32 /dev/urandom | base64 > "$P/token" && chmod 600 "$P/token"
  # daemon NAME ARGS...: starts a fleetsync daemon, prints its address.
  daemon() {
    local name=$1; shift
    "$BIN" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" &
    # (in a command substitution: PIDS would not outlive it)
    echo $! >> "$WORK/daemons.pid"
    for _ in $(seq 200); do
      [ -s "$WORK/$name.out" ] && break
      sleep 0.05
    done
    awk '/^listening on/ {print $3}' "$WORK/$name.out"
  }
  declare -A srv_time srv_m srv_a1 srv_a2 srv_sv
  sec() { if [ "$1" = tls ]; then echo "--tls $P/$2"; else echo "--token-file $P/token"; fi; }
  for mode in plain tls; do
    mkdir -p "$WORK/$mode-1" "$WORK/$mode-2"
    # shellcheck disable=SC2046
    srv_m[$mode]=$(daemon "$mode-m" agent --root "$M" --listen 127.0.0.1:0 $(sec $mode master))
    # shellcheck disable=SC2046
    srv_a1[$mode]=$(daemon "$mode-a1" agent --root "$WORK/$mode-1" --listen 127.0.0.1:0 $(sec $mode s1))
    # shellcheck disable=SC2046
    srv_a2[$mode]=$(daemon "$mode-a2" agent --root "$WORK/$mode-2" --listen 127.0.0.1:0 $(sec $mode s2))
    # shellcheck disable=SC2046
    srv_sv[$mode]=$(daemon "$mode-sv" server --listen 127.0.0.1:0 --jobs-db "$WORK/$mode-jobs.db" $(sec $mode server))
    srv_time[$mode]=999999
  done
  # Alternating, best of ROUNDS each: the disk still writing back one run's copy slows the
  # next, whichever it is.
  for round in $(seq "${ROUNDS:-3}"); do
    for mode in plain tls; do
      for r in 1 2; do find "$WORK/$mode-$r" -mindepth 1 -delete; done
      sync
      # shellcheck disable=SC2046
      took=$(t "$BIN" sync --server "${srv_sv[$mode]}" --master "${srv_m[$mode]}" $(sec $mode control) "${srv_a1[$mode]}" "${srv_a2[$mode]}")
      echo "--server initial copy, round $round, $mode: $took s" >&2
      srv_time[$mode]=$(min "${srv_time[$mode]}" "$took")
      for r in "$mode-1" "$mode-2"; do
        d=$(rsync -aHc -n -i --delete "$M/" "$WORK/$r/")
        [ -z "$d" ] || { echo "remote $r ($mode) differs:"; echo "$d" | head; exit 1; }
      done
    done
  done
  for mode in plain tls; do rm -rf "$WORK/$mode-1" "$WORK/$mode-2"; done
fi

# Referee: everything identical.
for r in f1 f2; do
  d=$(rsync -aHc -n -i --delete "$M/" "$WORK/$r/")
  [ -z "$d" ] || { echo "remote $r differs:"; echo "$d" | head; exit 1; }
done

printf '%-44s %8s s\n' "initial copy, fleetsync (fsync)" "$fs_init"
printf '%-44s %8s s\n' "initial copy, fleetsync --no-fsync" "$fs_init_nofsync"
printf '%-44s %8s s\n' "initial copy, rsync -a x2" "$rs_init"
printf '%-44s %8s s\n' "no-change re-sync, fleetsync (crc32)" "$fs_resync"
printf '%-44s %8s s\n' "no-change re-sync, fleetsync --no-checksum-cache" "$fs_resync_nc"
printf '%-44s %8s s\n' "no-change re-sync, rsync -ac x2" "$rs_resync"
echo "ratio initial (fleetsync/rsync, target <= 1.0): $(echo "scale=2; $fs_init / $rs_init" | bc) (fsync), $(echo "scale=2; $fs_init_nofsync / $rs_init" | bc) (--no-fsync)"
echo "speed-up re-sync (rsync/fleetsync, target >= 2): $(echo "scale=2; $rs_resync / $fs_resync" | bc) (checksum cache), $(echo "scale=2; $rs_resync / $fs_resync_nc" | bc) (--no-checksum-cache)"
if [ "${SERVER:-1}" = 1 ]; then
  printf '%-44s %8s s\n' "initial copy, --server, token (plaintext), best"  "${srv_time[plain]}"
  printf '%-44s %8s s\n' "initial copy, --server, --tls, best"  "${srv_time[tls]}"
  echo "ratio initial --server (fleetsync/rsync, target <= 1.0): $(echo "scale=2; ${srv_time[plain]} / $rs_init" | bc) (token), $(echo "scale=2; ${srv_time[tls]} / $rs_init" | bc) (--tls); TLS/plaintext time: $(echo "scale=2; ${srv_time[tls]} / ${srv_time[plain]}" | bc)"
fi
