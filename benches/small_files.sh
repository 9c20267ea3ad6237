#!/usr/bin/env bash
# Many small files (issue 12, item 5): fleetsync against rsync on one machine, in one run.
#
#   benches/small_files.sh [WORKDIR]
#
# Workload: FILES tiny files (default 200,000; 0..49 bytes each) in DIRS directories (default
# 400: 20 x 20), written once; the page cache is warm for both tools.
# 1. Initial copy to an empty remote: `fleetsync sync --server S --master M R` with a master
#    agent, a remote agent and a server as separate processes (fresh ones, default flags:
#    every received file durable before its rename), against `rsync -a M/ R/` to an empty
#    directory.
# 2. No-change re-sync against the same (still running) agents, content judged by checksum
#    (the agents' checksum cache), against rsync -a's quick check (size and mtime) of the
#    rsync copy. The tools alternate, ROUNDS (default 5) each; the medians are compared.
# Prints the times, the ratios fleetsync / rsync, and per process (master agent, remote agent,
# server) the peak RSS (VmHWM), bytes of it per file, and the CPU seconds (utime + stime) of
# each phase (the copy; the re-syncs per round). The referee (rsync -aHc -n -i --delete M/ R/)
# must find nothing (exit 1 otherwise).
#
# Environment: FILES, DIRS, ROUNDS, SEED (default 1), FLEETSYNC (binary; default
# target/release/fleetsync, built if missing), AGENT_FLAGS (extra `agent` flags of the remote,
# e.g. --no-fsync), KEEP=1 keeps WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-200000}
DIRS=${DIRS:-400}
SEED=${SEED:-1}
ROUNDS=${ROUNDS:-5}
BIN=${FLEETSYNC:-target/release/fleetsync}
[ -x "$BIN" ] || cargo build --release -p fleetsync >&2
BIN=$(realpath "$BIN")
WORK=${1:-$(mktemp -d /tmp/fleetsync-small.XXXXXX)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
M=$WORK/master
export HOME=$WORK/home  # checksum caches and write logs of the agents, job history
rm -rf "$HOME"; mkdir -p "$HOME"  # fresh: no cache or write log of an earlier run
TOKEN=$WORK/token
printf 'small-files-bench-token-0123456789\n' > "$TOKEN"
chmod 600 "$TOKEN"

if [ ! -d "$M" ]; then
  echo "generating $FILES files in $DIRS directories in $M ..." >&2
  python3 - "$M" "$FILES" "$DIRS" "$SEED" <<'PY'
import os, random, sys
root, n, dirs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
side = max(1, int(dirs ** 0.5))
for i in range(n):
    k = i % dirs
    d = os.path.join(root, f"d{k // side:03d}", f"s{k % side:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:07d}"), "wb") as f:
        f.write(rng.randbytes(rng.randrange(50)))
PY
fi
find "$M" -type f -exec cat {} + > /dev/null  # warm the page cache

now() { date +%s.%N; }
# start NAME ARGS...: a fleetsync process whose first stdout line is `listening on ADDR`;
# sets $ADDR and $PID_<NAME>.
start() {
  local name=$1; shift
  "$BIN" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  local pid=$!
  PIDS+=("$pid")
  local i
  for i in $(seq 500); do
    grep -q '^listening on ' "$WORK/$name.out" 2>/dev/null && break
    sleep 0.02
  done
  ADDR=$(sed -n 's/^listening on //p' "$WORK/$name.out" | head -1)
  [ -n "$ADDR" ] || { echo "$name did not start:"; cat "$WORK/$name.err"; exit 1; }
  eval "PID_$name=$pid"
}
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
cpu_s() { # utime + stime of PID, seconds
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}
referee() {
  local d
  d=$(rsync -aHc -n -i --delete "$M/" "$1/")
  [ -z "$d" ] || { echo "$1 differs from the master:"; echo "$d" | head; exit 1; }
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

rm -rf "$WORK/fs" "$WORK/rs"; mkdir -p "$WORK/fs" "$WORK/rs"; sync
start master agent --root "$M" --listen 127.0.0.1:0 --token-file "$TOKEN"; MA=$ADDR
# shellcheck disable=SC2086
start remote agent --root "$WORK/fs" --listen 127.0.0.1:0 --token-file "$TOKEN" ${AGENT_FLAGS:-}
RA=$ADDR
start server server --listen 127.0.0.1:0 --token-file "$TOKEN"; SA=$ADDR
sync_once() { "$BIN" sync --server "$SA" --master "$MA" --token-file "$TOKEN" "$RA" > /dev/null 2>&1; }

s=$(now); sync_once; e=$(now)
fs_init=$(echo "$e - $s" | bc)
init_cpu=("$(cpu_s "$PID_master")" "$(cpu_s "$PID_remote")" "$(cpu_s "$PID_server")")
init_hwm=("$(hwm_kb "$PID_master")" "$(hwm_kb "$PID_remote")" "$(hwm_kb "$PID_server")")
referee "$WORK/fs"
s=$(now); rsync -a "$M/" "$WORK/rs/"; e=$(now)
rs_init=$(echo "$e - $s" | bc)
referee "$WORK/rs"

fs_times=(); rs_times=()
for r in $(seq "$ROUNDS"); do
  s=$(now); sync_once; e=$(now); fs_times+=("$(echo "$e - $s" | bc)")
  s=$(now); rsync -a "$M/" "$WORK/rs/"; e=$(now); rs_times+=("$(echo "$e - $s" | bc)")
  echo "re-sync $r: fleetsync ${fs_times[-1]} s, rsync ${rs_times[-1]} s; peak RSS so far: master $(hwm_kb "$PID_master") KiB, remote $(hwm_kb "$PID_remote") KiB" >&2
done
fs_re=$(median "${fs_times[@]}"); rs_re=$(median "${rs_times[@]}")
referee "$WORK/fs"
all_cpu=("$(cpu_s "$PID_master")" "$(cpu_s "$PID_remote")" "$(cpu_s "$PID_server")")
all_hwm=("$(hwm_kb "$PID_master")" "$(hwm_kb "$PID_remote")" "$(hwm_kb "$PID_server")")

echo "small files: $FILES files (0..49 bytes) in $DIRS directories; remote agent flags: ${AGENT_FLAGS:-(default)}"
printf '%-34s %8.2f s   rsync -a %8.2f s   ratio %s (target <= 1.0)\n' \
  "initial copy, fleetsync" "$fs_init" "$rs_init" "$(ratio "$fs_init" "$rs_init")"
printf '%-34s %8.2f s   rsync -a %8.2f s   ratio %s (target <= 1.0)\n' \
  "no-change re-sync (median of $ROUNDS)" "$fs_re" "$rs_re" "$(ratio "$fs_re" "$rs_re")"
names=("master agent" "remote agent" "server")
for k in 0 1 2; do
  printf '%-14s copy: peak RSS %7.1f MiB (%4.0f B/file), CPU %6.2f s | with the re-syncs: peak %7.1f MiB (%4.0f B/file), CPU %5.2f s per re-sync\n' \
    "${names[$k]}" "$(awk -v k="${init_hwm[$k]}" 'BEGIN { print k / 1024 }')" \
    "$(awk -v k="${init_hwm[$k]}" -v n="$FILES" 'BEGIN { print k * 1024 / n }')" "${init_cpu[$k]}" \
    "$(awk -v k="${all_hwm[$k]}" 'BEGIN { print k / 1024 }')" \
    "$(awk -v k="${all_hwm[$k]}" -v n="$FILES" 'BEGIN { print k * 1024 / n }')" \
    "$(awk -v a="${all_cpu[$k]}" -v b="${init_cpu[$k]}" -v r="$ROUNDS" 'BEGIN { print (a - b) / r }')"
done
