#!/usr/bin/env bash
# What TLS costs: a SIZE file (default 2 GiB of random bytes) synced in --server mode over
# loopback, once by a plaintext fleet (token) and once by a TLS fleet (--tls), alternating,
# best of ROUNDS each; prints both times, throughputs and the ratio TLS / plaintext
# (throughput; 1.0 = free).
#
#   benches/tls_cost.sh [WORKDIR]
#
# Both fleets run the same binary on the same trees: two agents (--no-fsync: the disk is
# not what is measured) and a server each; every sync starts from an empty remote, with
# --max-rounds 0 (the consistency check re-reads the file: the same cost on both sides,
# which would only dilute the ratio). The referee (rsync -aHc -n -i --delete) must print
# nothing after each sync.
#
# With LAB=1 (root, ../shared/fleetlab) each part runs on its own lab host (a network
# namespace) and the stream crosses real veth links through the lab's bridge, uncapped,
# instead of loopback.
#
# Environment: SIZE (bytes, default 2147483648), ROUNDS (default 3), FLEETSYNC (binary,
# default target/release/fleetsync; built if missing), LAB (default 0), KEEP=1 keeps WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-2147483648}
ROUNDS=${ROUNDS:-3}
BIN=${FLEETSYNC:-target/release/fleetsync}
[ -x "$BIN" ] || cargo build --release -p fleetsync >&2
BIN=$(realpath "$BIN")
WORK=${1:-$(mktemp -d /tmp/fleetsync-tls-bench.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
LAB=${LAB:-0}
FL=$(realpath ../shared/fleetlab/fleetlab 2>/dev/null || true)
export FLEETLAB_PREFIX=tlsb
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ ! -f "$WORK/daemons.pid" ] || while read -r p; do kill "$p" 2>/dev/null || true; done < "$WORK/daemons.pid"
  [ "$LAB" != 1 ] || "$FL" down 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
mkdir -p master remote home
export HOME=$WORK/home XDG_STATE_HOME=$WORK/home/state XDG_CACHE_HOME=$WORK/home/cache
unset FLEETSYNC_TOKEN
if [ ! -f master/big ] || [ "$(stat -c %s master/big)" != "$SIZE" ]; then
  echo "writing $SIZE random bytes ..." >&2
  head -c "$SIZE" /dev/urandom > master/big
fi
cat master/big > /dev/null # warm the page cache

# on HOST CMD...: runs CMD on lab host HOST (LAB=1), else here. Addresses: A[HOST].
declare -A A
if [ "$LAB" = 1 ]; then
  [ -x "$FL" ] || { echo "LAB=1 needs ../shared/fleetlab/fleetlab" >&2; exit 2; }
  "$FL" down 2>/dev/null || true
  "$FL" up m r s > /dev/null
  for h in m r s; do A[$h]=$("$FL" addr "$h"); done
  on() { local h=$1; shift; "$FL" exec "$h" "$@"; }
else
  for h in m r s; do A[$h]=127.0.0.1; done
  on() { shift; "$@"; }
fi
# spawn HOST CMD...: as `on`, for a background job: exec, so that $! is the daemon itself.
spawn() { if [ "$LAB" = 1 ]; then local h=$1; shift; exec "$FL" exec "$h" "$@"; else shift; exec "$@"; fi; }

rm -rf pki && mkdir pki
"$BIN" cert init pki/ca > /dev/null
"$BIN" cert issue --ca pki/ca --role agent --san "${A[m]}" --out pki/master master > /dev/null
"$BIN" cert issue --ca pki/ca --role agent --san "${A[r]}" --out pki/remote remote > /dev/null
"$BIN" cert issue --ca pki/ca --role server --san "${A[s]}" --out pki/server server > /dev/null
"$BIN" cert issue --ca pki/ca --role control --out pki/control control > /dev/null
head -c 32 /dev/urandom | base64 > token && chmod 600 token

# start HOST NAME ARGS...: runs a fleetsync daemon on HOST, prints its address.
start() {
  local host=$1 name=$2; shift 2
  spawn "$host" "$BIN" "$@" > "$name.out" 2> "$name.err" &
  # (in a command substitution: PIDS would not outlive it)
  echo $! >> "$WORK/daemons.pid"
  for _ in $(seq 100); do
    [ -s "$name.out" ] && break
    sleep 0.05
  done
  awk '/^listening on/ {print $3}' "$name.out"
}
declare -A M R S
for mode in plain tls; do
  if [ $mode = tls ]; then
    sec_m=(--tls pki/master); sec_r=(--tls pki/remote); sec_s=(--tls pki/server)
  else
    sec_m=(--token-file token); sec_r=(--token-file token); sec_s=(--token-file token)
  fi
  M[$mode]=$(start m "$mode-master" agent --no-fsync --root master --listen "${A[m]}:0" "${sec_m[@]}")
  R[$mode]=$(start r "$mode-remote" agent --no-fsync --root remote --listen "${A[r]}:0" "${sec_r[@]}")
  S[$mode]=$(start s "$mode-server" server --listen "${A[s]}:0" --jobs-db "$WORK/jobs-$mode.db" "${sec_s[@]}")
done

run() {
  local mode=$1 sec s e
  if [ "$mode" = tls ]; then sec=(--tls pki/control); else sec=(--token-file token); fi
  rm -rf remote/* remote/.fleetsync* 2>/dev/null || true
  sync
  s=$(date +%s.%N)
  on s "$BIN" sync --server "${S[$mode]}" --master "${M[$mode]}" --max-rounds 0 "${sec[@]}" "${R[$mode]}" > /dev/null
  e=$(date +%s.%N)
  d=$(rsync -aHc -n -i --delete master/ remote/)
  [ -z "$d" ] || { echo "$mode: remote differs: $d" >&2; exit 1; }
  echo "$e - $s" | bc
}
min() { echo "$1 $2" | awk '{print ($1 < $2) ? $1 : $2}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
best_plain=999999; best_tls=999999; all_plain=(); all_tls=()
for i in $(seq "$ROUNDS"); do
  p=$(run plain); t=$(run tls)
  echo "round $i: plaintext ${p}s, TLS ${t}s" >&2
  best_plain=$(min "$best_plain" "$p"); best_tls=$(min "$best_tls" "$t")
  all_plain+=("$p"); all_tls+=("$t")
done
med_plain=$(median "${all_plain[@]}"); med_tls=$(median "${all_tls[@]}")
mib=$(echo "$SIZE / 1048576" | bc)
where=loopback; [ "$LAB" != 1 ] || where="uncapped lab links"
awk -v lab="$where" -v mp="$med_plain" -v mt="$med_tls" -v p="$best_plain" -v t="$best_tls" -v m="$mib" 'BEGIN {
  printf "file: %d MiB, %s, --server mode, best of rounds\n", m, lab
  printf "plaintext: %.2f s (%.0f MiB/s)\n", p, m / p
  printf "TLS 1.3:   %.2f s (%.0f MiB/s)\n", t, m / t
  printf "TLS / plaintext throughput: %.2fx (best of rounds), %.2fx (medians: %.2f s, %.2f s)\n", p / t, mp / mt, mp, mt
}'
