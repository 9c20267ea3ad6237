#!/usr/bin/env bash
# Release-update benchmark (issue 11, item 1): fleetsync against rsync on a real network.
#
#   benches/fleet_update.sh [--remotes N] [--rate RATE] [--small] [--tools LIST] [--seed-locally]
#   benches/fleet_update.sh --scale 1,4,16 [--rate RATE] [--small] [--tools LIST]
#
# Workload: two consecutive releases of real upstream software, binary wheels from PyPI
# (manylinux2014 x86_64, CPython 3.11), unpacked side by side as a site-packages tree would
# hold them: numpy 1.26.3 -> 1.26.4, scipy 1.13.0 -> 1.13.1 (its 35 MB OpenBLAS is renamed
# libopenblasp-r0-24bff013.3.26.dev.so -> libopenblasp-r0-01191904.3.27.so), pandas 2.1.3 ->
# 2.1.4: 226 MB and 3,714 files, of which 184 files / 92 MB differ. --small takes scipy
# alone (120 MB, 1,329 files, 75 files / 58 MB differ). FLEET_PACKAGES="name:old:new ..."
# picks other packages. Wheels and unpacked trees are cached in
# ${FLEET_CACHE:-~/.cache/fleetsync-bench} (never in the repository).
#
# Lab (../shared/fleetlab/fleetlab, or $FLEETLAB): hosts master, srv, r1..rN, every link capped
# at RATE (default 100mbit). The master runs a fleetsync agent (with --keep-versions 2GiB
# when the binary has it), srv the fleetsync server (the control client runs there too), each
# remote a fleetsync agent and an rsync daemon. Every tool has its own tree on each remote, so
# each tool starts phase 2 from its own phase-1 result (checked equal to the old release).
#
# Phase 1 rolls the old release out to empty remotes; then the master's tree is upgraded in
# place as an installer does (every file of the new release written over, files the new
# release lacks deleted); phase 2 pushes the update. Per phase and tool, all remotes at once:
#   fleetsync   fleetsync sync --server SRV --master MASTER --delete $FLEETSYNC_FLAGS R1..RN
#               (relay trees, the default --fanout)
#   fleetsync-direct  the same with --fanout 0 (the master sends to every remote itself; its
#               own agent and tree on each remote)
#   rsync       rsync -a --delete MASTER/ rsync://Ri/...      (one per remote, in parallel)
#   rsync-az    rsync -az --delete MASTER/ rsync://Ri/...
#   rsync-acz   rsync -acz --zc=zstd --delete MASTER/ rsync://Ri/...
# and prints wall time, bytes that left the master (its link's tx counter), bytes into each
# remote (rx, mean and max), bytes into and out of the server's host (fleetsync: file lists,
# requests, results), CPU seconds on the master, on the busiest remote, on all remotes and on
# the server (fleetsync: its agents and server; rsync: the clients on the master, the daemons'
# connection processes on the remotes), the ratios fleetsync / rsync-acz, and the differences
# the referee (rsync -aHc -n -i --delete MASTER/ REMOTE/) finds afterwards (must be 0; the exit
# status is 1 otherwise).
#
# Options: --remotes N (default 4), --rate RATE (default 100mbit), --small, --tools LIST
# (comma-separated, default fleetsync,rsync,rsync-acz; also fleetsync-direct, rsync-az),
# --seed-locally (phase 1 of every tool but fleetsync is a local `cp -a` of the old release
# into its trees, not measured: what rsync's phase 1 would leave, in seconds instead of the
# minutes N copies take through one uplink).
# --scale LIST (e.g. 1,4,16): runs the benchmark once per remote count (with --seed-locally;
# rsync tools only at the largest count) and prints, per phase, fleetsync's wall time and
# master bytes for each count as ratios to those for the first count, against
# fleetsync-direct, and against the best rsync at the largest count.
# Environment: FLEETSYNC_BIN (binary; default: cargo build --release, then target/release/
# fleetsync), FLEETSYNC_FLAGS (extra `sync` flags), FLEETSYNC_AGENT_FLAGS (extra `agent` flags;
# default --no-fsync, as rsync does not fsync either), FLEETLAB_PREFIX (lab name, default fb),
# FLEET_CACHE, FLEET_PACKAGES, KEEP=1 keeps the work directory, PERF=DIR records every
# fleetsync run system-wide (`perf record -a -g`: all hosts share the one kernel) into
# DIR/TOOL.PHASE.data, e.g. `perf report -i DIR/fleetsync.2.data --sort comm,sym`; PERF_ARGS
# replaces its -g (e.g. "-F 299 --call-graph dwarf"); perf's own cost skews those runs' times.
# PREFAULT=0 skips touching memory before each run (see prefault below). LOOPFS=0 keeps the
# trees on the work directory's own file system instead of a fresh journaled ext4 image (see
# below). Needs root, iproute2, rsync (>= 3.2 for --zc), python3 with pip, e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REMOTES=4 RATE=100mbit SMALL=0 TOOLS=fleetsync,rsync,rsync-acz SEED=0 SCALE=""
ARGS=("$@")
usage() { sed -n '2,58p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --remotes) REMOTES=$2; shift 2;;
    --rate) RATE=$2; shift 2;;
    --small) SMALL=1; shift;;
    --tools) TOOLS=$2; shift 2;;
    --seed-locally) SEED=1; shift;;
    --scale) SCALE=$2; shift 2;;
    -h|--help) usage;;
    *) echo "fleet_update: unknown argument $1" >&2; usage 2 >&2;;
  esac
done
[[ $REMOTES =~ ^[1-9][0-9]?$ ]] || { echo "fleet_update: --remotes 1..99" >&2; exit 2; }
IFS=, read -r -a TOOL_LIST <<< "$TOOLS"
for t in "${TOOL_LIST[@]}"; do
  case $t in fleetsync|fleetsync-direct|rsync|rsync-az|rsync-acz) ;; *) echo "fleet_update: unknown tool $t" >&2; exit 2;; esac
done

# --- --scale: one run per remote count, then the ratios -------------------------------------
if [ -n "$SCALE" ]; then
  IFS=, read -r -a COUNTS <<< "$SCALE"
  OUT=$(mktemp -d /tmp/fleet-scale.XXXXXX)
  PASS=()
  for a in "${ARGS[@]}"; do PASS+=("$a"); done
  # Drop --scale LIST and any --remotes/--tools from what is passed on.
  FWD=(); skip=0
  for a in "${PASS[@]}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case $a in --scale|--remotes|--tools) skip=1;; --seed-locally) ;; *) FWD+=("$a");; esac
  done
  last=${COUNTS[${#COUNTS[@]}-1]}
  [ -n "${FLEETSYNC_BIN:-}" ] || { cargo build --release -p fleetsync >&2; export FLEETSYNC_BIN=$PWD/target/release/fleetsync; }
  for n in "${COUNTS[@]}"; do
    tools=fleetsync,fleetsync-direct
    [ "$n" = "$last" ] && tools=fleetsync,fleetsync-direct,rsync,rsync-az,rsync-acz
    echo "=== $n remote(s): $tools" >&2
    SUMMARY=$OUT/$n "$0" "${FWD[@]}" --remotes "$n" --tools "$tools" --seed-locally | tee "$OUT/$n.table"
  done
  echo
  echo "scale: ${COUNTS[*]} remotes, every link $RATE (wall s / master tx MB; ratios to ${COUNTS[0]} remote(s))"
  for phase in 1 2; do
    echo
    [ "$phase" = 1 ] && echo "phase 1: old release to empty remotes" || echo "phase 2: update"
    printf '%-8s %-17s %9s %13s %11s %11s %14s %12s\n' remotes tool "wall s" "master tx MB" "wall ratio" "tx ratio" "lab CPU s" "CPU / cores"
    for n in "${COUNTS[@]}"; do
      for t in fleetsync fleetsync-direct rsync rsync-az rsync-acz; do
        awk -v t="$t" -v p="$phase" -v n="$n" -v cores="$(nproc)" -v base="$OUT/${COUNTS[0]}" '
          BEGIN { while ((getline l < base) > 0) { split(l, f); if (f[1] == t && f[2] == p) { bw = f[3]; bt = f[4] } } }
          $1 == t && $2 == p && $3 != "-" {
            wr = (bw > 0) ? sprintf("%.2fx", $3 / bw) : "-"; tr = (bt > 0) ? sprintf("%.2fx", $4 / bt) : "-"
            cpu = "-"; floor = "-"
            if ($5 != "-" && $6 != "-") { c = $5 + $6 + ($7 == "-" ? 0 : $7); cpu = sprintf("%.2f", c); floor = sprintf("%.2f", c / cores) }
            printf "%-8s %-17s %9s %13.1f %11s %11s %14s %12s\n", n, t, $3, $4 / 1e6, wr, tr, cpu, floor }' "$OUT/$n"
      done
    done
    awk -v p="$phase" '
      $2 == p && $3 != "-" { w[$1] = $3 }
      END {
        best = 0; for (t in w) if (t ~ /^rsync/ && (best == 0 || w[t] < best)) { best = w[t]; bt = t }
        if (best > 0 && w["fleetsync"] > 0) printf "largest count: best rsync (%s) %.1f s; fleetsync %.2f s: %.1fx faster; fleetsync-direct %.2f s\n", bt, best, w["fleetsync"], best / w["fleetsync"], w["fleetsync-direct"]
      }' "$OUT/$last"
  done
  echo "(lab CPU s: the server, the master and every remote: fleetsync's server and agents, or"
  echo " rsync's clients and daemons; CPU / cores: the least wall time that CPU allows on this"
  echo " machine's $(nproc) cores, which all hosts of the lab share. Per-run tables: $OUT/*.table)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "fleet_update: needs root (network namespaces)" >&2; exit 2; }

FLEETLAB=${FLEETLAB:-$ROOT/../shared/fleetlab/fleetlab}
[ -f "$FLEETLAB" ] || { echo "fleet_update: no fleetlab at $FLEETLAB (set FLEETLAB)" >&2; exit 2; }
export FLEETLAB_PREFIX=${FLEETLAB_PREFIX:-fb}
lab() { bash "$FLEETLAB" "$@"; }

if [ -n "${FLEETSYNC_BIN:-}" ]; then
  BIN=$FLEETSYNC_BIN
else
  cargo build --release -p fleetsync >&2
  BIN=$ROOT/target/release/fleetsync
fi
BIN=$(realpath "$BIN")
AGENT_FLAGS=${FLEETSYNC_AGENT_FLAGS---no-fsync}

CACHE=${FLEET_CACHE:-$HOME/.cache/fleetsync-bench}
if [ -n "${FLEET_PACKAGES:-}" ]; then
  PACKAGES=$FLEET_PACKAGES
elif [ "$SMALL" = 1 ]; then
  PACKAGES="scipy:1.13.0:1.13.1"
else
  PACKAGES="numpy:1.26.3:1.26.4 scipy:1.13.0:1.13.1 pandas:2.1.3:2.1.4"
fi

# --- workload: wheels from PyPI, unpacked once into $CACHE/trees/KEY/{old,new} -------------
mkdir -p "$CACHE/wheels" "$CACHE/trees"
wheel() { # name version -> path of the cached wheel (downloaded if missing)
  local w
  w=$(ls "$CACHE/wheels/$1-$2-"*.whl 2>/dev/null | head -1 || true)
  if [ -z "$w" ]; then
    echo "downloading $1==$2 from PyPI ..." >&2
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version 3.11 -d "$CACHE/wheels" "$1==$2" >&2
    w=$(ls "$CACHE/wheels/$1-$2-"*.whl | head -1)
  fi
  echo "$w"
}
KEY=$(echo "$PACKAGES" | tr ' :' '_-')
TREES=$CACHE/trees/$KEY
if [ ! -f "$TREES/done" ]; then
  rm -rf "$TREES"; mkdir -p "$TREES/old" "$TREES/new"
  for p in $PACKAGES; do
    IFS=: read -r name old new <<< "$p"
    python3 -m zipfile -e "$(wheel "$name" "$old")" "$TREES/old"
    # A second, later unpack: the new release's files all get new mtimes, as an install does.
    python3 -m zipfile -e "$(wheel "$name" "$new")" "$TREES/new"
  done
  touch "$TREES/done"
fi
OLD=$TREES/old NEW=$TREES/new

WORK=$(mktemp -d /tmp/fleet-update.XXXXXX)
PIDS=() LOOPDEV=""
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  lab down >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then
    echo "kept $WORK${LOOPDEV:+ (mounted from $LOOPDEV, image $WORK.img: umount, losetup -d, rm when done)}" >&2
    return
  fi
  if [ -n "$LOOPDEV" ]; then
    umount "$WORK" 2>/dev/null || umount -l "$WORK" 2>/dev/null || true
    losetup -d "$LOOPDEV" 2>/dev/null || true
    rm -f "$WORK.img"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every tree of the run (master, remotes, versions, caches) lives on a fresh ext4 with its
# journal, as the machines of a fleet have, in an image on a loop device (direct I/O: no second
# page cache). Why: the lab VM's own root is an ext4 without a journal, where creating a file
# scans past every inode freed in the last 30 seconds (ext4 keeps them for fsck without a
# journal): writing the update's 75 files to 16 trees took 1.6 s of kernel time there after
# earlier runs had deleted trees, 0.5 s on a journaled ext4 (more than half of it in
# find_inode_bit / recently_deleted), and every tool paid it in proportion to the files it
# created, worse the later it ran. A fresh file system also makes runs repeatable.
# LOOPFS=0 runs on the work directory's own file system.
if [ "${LOOPFS:-1}" = 1 ]; then
  command -v mkfs.ext4 > /dev/null && command -v losetup > /dev/null \
    || { echo "fleet_update: LOOPFS needs mkfs.ext4 and losetup (e2fsprogs, mount), or set LOOPFS=0" >&2; exit 2; }
  need=$(du -sb "$OLD" "$NEW" | awk -v n="$REMOTES" -v t="${#TOOL_LIST[@]}" '{s += $1} END {
    printf "%d", (s * (n * t + 4) * 1.5) / 1048576 + 1024 }')
  free=$(df -Pm "$(dirname "$WORK")" | awk 'NR == 2 {print $4}')
  [ "$need" -lt "$free" ] || { echo "fleet_update: the trees need ~$need MiB, $(dirname "$WORK") has $free MiB free (or set LOOPFS=0)" >&2; exit 2; }
  truncate -s "${need}M" "$WORK.img"
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$WORK.img"
  LOOPDEV=$(losetup -f --show --direct-io=on "$WORK.img")
  mount "$LOOPDEV" "$WORK"
fi

# Workload figures: files and bytes of each release, and what differs old -> new.
read -r W_FILES W_BYTES D_FILES D_BYTES <<< "$(python3 - "$OLD" "$NEW" <<'PY'
import filecmp, os, sys
old, new = sys.argv[1:]
files = size = dfiles = dsize = 0
for d, _, names in os.walk(new):
    for n in names:
        p = os.path.join(d, n)
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        s = os.path.getsize(p)
        files += 1; size += s
        o = os.path.join(old, os.path.relpath(p, new))
        if not (os.path.isfile(o) and filecmp.cmp(o, p, shallow=False)):
            dfiles += 1; dsize += s
print(files, size, dfiles, dsize)
PY
)"
read -r O_FILES O_BYTES <<< "$(find "$OLD" -type f -printf '%s\n' | awk '{n++; s+=$1} END {print n, s}')"
mb() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}'; }

# --- lab -----------------------------------------------------------------------------------
RS=(); for i in $(seq "$REMOTES"); do RS+=("r$i"); done
lab down >/dev/null 2>&1 || true
lab up master srv "${RS[@]}" --rate "$RATE"
declare -A ADDR
for h in master srv "${RS[@]}"; do ADDR[$h]=$(lab addr "$h"); done

M=$WORK/master
mkdir -p "$M"
cp -a "$OLD/." "$M/"
printf 'bench-token-%s\n' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" > "$WORK/token"
chmod 600 "$WORK/token"

# Each host has its own home (checksum cache, write log, job history), as separate machines do.
# exec_in_host HOST CMD...: becomes CMD run in HOST (call it in the background, `( ... ) &` or
# `... &`, so that $! is CMD's own pid: fleetlab and `ip netns exec` exec too).
exec_in_host() {
  local h=$1; shift
  mkdir -p "$WORK/home/$h"
  exec bash "$FLEETLAB" exec "$h" env HOME="$WORK/home/$h" XDG_CACHE_HOME="$WORK/home/$h/.cache" \
    XDG_STATE_HOME="$WORK/home/$h/.local/state" FLEETSYNC_JOBS_DB="$WORK/home/$h/jobs.sqlite" "$@"
}
wait_listening() { # file what
  local i
  for i in $(seq 200); do
    grep -q '^listening on ' "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "fleet_update: $2 did not start:" >&2; cat "$1" >&2; exit 1
}

MASTER_FLAGS=()
declare -A AGENT_PID DAEMON_PID
AGENT_HELP=$("$BIN" agent --help 2>/dev/null || true)
if grep -q -- '--keep-versions' <<< "$AGENT_HELP"; then
  MASTER_FLAGS=(--keep-versions 2GiB)
  grep -q -- '--versions-dir' <<< "$AGENT_HELP" && MASTER_FLAGS+=(--versions-dir "$WORK/versions")
else
  echo "note: $BIN agent has no --keep-versions; the master agent runs without it" >&2
fi
# shellcheck disable=SC2086 # AGENT_FLAGS and FLEETSYNC_FLAGS are word lists
start_agent() { # host root [flags...]
  local h=$1 root=$2; shift 2
  exec_in_host "$h" "$BIN" agent --root "$root" --listen "${ADDR[$h]}:7070" --token-file "$WORK/token" \
    $AGENT_FLAGS "$@" > "$WORK/$h.agent.out" 2> "$WORK/$h.agent.err" &
  PIDS+=($!); AGENT_PID[$h]=$!
  wait_listening "$WORK/$h.agent.out" "agent on $h"
}
# The second agent of a remote (fleetsync-direct's tree): host port root key
start_agent_on() {
  local h=$1 port=$2 root=$3 key=$4
  # shellcheck disable=SC2086
  exec_in_host "$h" "$BIN" agent --root "$root" --listen "${ADDR[$h]}:$port" --token-file "$WORK/token" \
    $AGENT_FLAGS > "$WORK/$h.$key.agent.out" 2> "$WORK/$h.$key.agent.err" &
  PIDS+=($!); AGENT_PID[$h.$key]=$!
  wait_listening "$WORK/$h.$key.agent.out" "agent $key on $h"
}
start_agent master "$M" "${MASTER_FLAGS[@]}"
has_tool() { local t; for t in "${TOOL_LIST[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
for r in "${RS[@]}"; do
  mkdir -p "$WORK/$r/fleetsync" "$WORK/$r/fleetsync-direct" "$WORK/$r/rsync" "$WORK/$r/rsync-az" "$WORK/$r/rsync-acz"
  start_agent "$r" "$WORK/$r/fleetsync"
  if has_tool fleetsync-direct; then
    start_agent_on "$r" 7071 "$WORK/$r/fleetsync-direct" direct
  fi
  cat > "$WORK/$r/rsyncd.conf" <<EOF
use chroot = no
uid = root
gid = root
[rsync]
path = $WORK/$r/rsync
read only = no
[rsync-az]
path = $WORK/$r/rsync-az
read only = no
[rsync-acz]
path = $WORK/$r/rsync-acz
read only = no
EOF
  bash "$FLEETLAB" exec "$r" rsync --daemon --no-detach --address "${ADDR[$r]}" --port 873 \
    --config "$WORK/$r/rsyncd.conf" --log-file "$WORK/$r.rsyncd.log" 2> "$WORK/$r.rsyncd.err" &
  PIDS+=($!); DAEMON_PID[$r]=$!
done
exec_in_host srv "$BIN" server --listen "${ADDR[srv]}:7000" --token-file "$WORK/token" \
  > "$WORK/srv.out" 2> "$WORK/srv.err" &
PIDS+=($!); SERVER_PID=$!
wait_listening "$WORK/srv.out" "server"
for r in "${RS[@]}"; do
  for i in $(seq 100); do
    lab exec master rsync "rsync://${ADDR[$r]}/" >/dev/null 2>&1 && break
    [ "$i" = 100 ] && { echo "fleet_update: rsync daemon on $r did not start" >&2; cat "$WORK/$r.rsyncd.err" >&2; exit 1; }
    sleep 0.05
  done
done

# --- runs ----------------------------------------------------------------------------------
run_tool() { # tool phase -> log in $WORK/TOOL.PHASE.log; fails if any remote fails
  local tool=$1 log=$WORK/$1.$2.log r pids=() rc=0
  case $tool in
    fleetsync|fleetsync-direct)
      local remotes=() port=7070 fan=()
      [ "$tool" = fleetsync-direct ] && { port=7071; fan=(--fanout 0); }
      for r in "${RS[@]}"; do remotes+=("${ADDR[$r]}:$port"); done
      # shellcheck disable=SC2086
      (exec_in_host srv "$BIN" sync --server "${ADDR[srv]}:7000" --master "${ADDR[master]}:7070" \
        --token-file "$WORK/token" --delete ${FLEETSYNC_FLAGS:-} "${fan[@]}" "${remotes[@]}") > "$log" 2>&1 || rc=$?;;
    rsync|rsync-az|rsync-acz)
      local flags=(-a --delete)
      [ "$tool" = rsync-az ] && flags=(-az --delete)
      [ "$tool" = rsync-acz ] && flags=(-acz --zc=zstd --delete)
      for r in "${RS[@]}"; do
        bash "$FLEETLAB" exec master rsync "${flags[@]}" "$M/" "rsync://${ADDR[$r]}/$tool/" > "$log.$r" 2>&1 &
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p" || rc=$?; done
      cat "$log".r* > "$log";;
  esac
  if [ "$rc" != 0 ]; then echo "fleet_update: $tool failed in phase $2 (exit $rc):" >&2; tail -20 "$log" >&2; fi
  return "$rc"
}

declare -A WALL TX RXMEAN RXMAX DIFFS MCPU RCPU RCPUSUM SCPU SRV
FAILED=0
TICK=$(getconf CLK_TCK)
# CPU ticks of a process: "own" (utime + stime) or "children" (cutime + cstime: the children it
# has reaped, e.g. an rsync daemon's connection handlers, or this script's rsync clients).
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk -v w="$2" '{print (w == "own") ? $12 + $13 : $14 + $15}'; }
# CPU seconds the tool used on the server's host, the master and each remote, around one run.
cpu_snapshot() { # tool -> "server master r1 r2 ..." in ticks
  local r out
  if [ "$1" = fleetsync ] || [ "$1" = fleetsync-direct ]; then
    local key=""; [ "$1" = fleetsync-direct ] && key=.direct
    out="$(ticks "$SERVER_PID" own) $(ticks "${AGENT_PID[master]}" own)"
    for r in "${RS[@]}"; do out+=" $(ticks "${AGENT_PID[$r$key]}" own)"; done
  else
    out="0 $(ticks $$ children)"
    for r in "${RS[@]}"; do out+=" $(ticks "${DAEMON_PID[$r]}" children)"; done
  fi
  echo "$out"
}
# Memory the VM has not touched yet (or gave back to its host) costs a fault in the host at
# its first touch: on the lab VM a 6 GB dd ran at 0.5 GB/s into such memory and at 2.3 GB/s
# right after the same amount was freed. Whichever tool ran first in a phase paid for that
# (the 16-remote update 2.8 s first, 1.1 s second). So before each run, twice what it may
# write is written to tmpfs and freed: every tool starts on memory the VM has just used.
# PREFAULT=0 turns it off.
prefault() { # phase
  [ "${PREFAULT:-1}" = 1 ] || return 0
  local want=$(( (${1} == 1 ? O_BYTES : D_BYTES) * REMOTES * 2 / 1048576 + 64 ))
  local avail; avail=$(awk '/^MemAvailable:/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  [ "$want" -le "$avail" ] || want=$avail
  local f; f=$(mktemp -p /dev/shm fleet-prefault.XXXXXX)
  head -c "${want}M" /dev/zero > "$f" || true
  rm -f "$f"
}
measure() { # tool phase
  local tool=$1 phase=$2 r s e tx0 rx0=() rx sum=0 max=0 diffs=0 n
  sync  # the previous run's writes are not this run's cost
  prefault "$phase"
  tx0=$(lab bytes master tx)
  local srx0 stx0
  srx0=$(lab bytes srv rx); stx0=$(lab bytes srv tx)
  for r in "${RS[@]}"; do rx0+=("$(lab bytes "$r" rx)"); done
  local c0 c1
  c0=$(cpu_snapshot "$tool")
  local perf_pid=""
  if [ -n "${PERF:-}" ] && [[ $tool == fleetsync* ]]; then
    mkdir -p "$PERF"
    perf record -q -a ${PERF_ARGS:--g} -o "$PERF/$tool.$phase.data" 2> "$PERF/$tool.$phase.err" &
    perf_pid=$!
    sleep 0.5  # perf has its buffers set up
  fi
  s=$(date +%s.%N)
  run_tool "$tool" "$phase" || FAILED=1
  e=$(date +%s.%N)
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  c1=$(cpu_snapshot "$tool")
  read -r SCPU[$tool.$phase] MCPU[$tool.$phase] RCPU[$tool.$phase] RCPUSUM[$tool.$phase] <<< "$(awk -v a="$c0" -v b="$c1" -v t="$TICK" 'BEGIN {
    n = split(a, x); split(b, y); max = 0; sum = 0
    for (i = 3; i <= n; i++) { d = y[i] - x[i]; sum += d; if (d > max) max = d }
    printf "%.2f %.2f %.2f %.2f\n", (y[1] - x[1]) / t, (y[2] - x[2]) / t, max / t, sum / t }')"
  TX[$tool.$phase]=$(( $(lab bytes master tx) - tx0 ))
  SRV[$tool.$phase]=-
  case $tool in fleetsync*) SRV[$tool.$phase]="$(mb $(( $(lab bytes srv rx) - srx0 )))/$(mb $(( $(lab bytes srv tx) - stx0 )))";; esac
  local i=0
  for r in "${RS[@]}"; do
    rx=$(( $(lab bytes "$r" rx) - rx0[i] )); i=$((i + 1))
    sum=$((sum + rx)); [ "$rx" -gt "$max" ] && max=$rx
    n=$(rsync -aHc -n -i --delete "$M/" "$WORK/$r/$tool/" | wc -l)
    diffs=$((diffs + n))
  done
  [ "$diffs" = 0 ] || FAILED=1
  WALL[$tool.$phase]=$(awk -v s="$s" -v e="$e" 'BEGIN {printf "%.2f", e - s}')
  RXMEAN[$tool.$phase]=$((sum / REMOTES)); RXMAX[$tool.$phase]=$max; DIFFS[$tool.$phase]=$diffs
  echo "  $tool phase $phase: ${WALL[$tool.$phase]} s, master sent $(mb "${TX[$tool.$phase]}") MB, referee differences $diffs" >&2
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "phase 1: rolling out the old release ..." >&2
for t in "${TOOL_LIST[@]}"; do
  if [ "$SEED" = 1 ] && [ "$t" != fleetsync ]; then
    # Not measured: what the tool's own phase 1 would leave (checked by the referee).
    for r in "${RS[@]}"; do cp -a "$OLD/." "$WORK/$r/$t/"; done
    WALL[$t.1]=- TX[$t.1]=0 RXMEAN[$t.1]=0 RXMAX[$t.1]=0 MCPU[$t.1]=- RCPU[$t.1]=- RCPUSUM[$t.1]=- SCPU[$t.1]=- SRV[$t.1]=-
    d=0; for r in "${RS[@]}"; do d=$((d + $(rsync -aHc -n -i --delete "$M/" "$WORK/$r/$t/" | wc -l))); done
    DIFFS[$t.1]=$d
    echo "  $t phase 1: seeded locally (cp -a), referee differences $d" >&2
    continue
  fi
  measure "$t" 1
done

echo "upgrading the master in place ..." >&2
cp -a "$NEW/." "$M/"
python3 - "$NEW" "$M" <<'PY'
import os, shutil, sys
new, m = sys.argv[1:]
for d, dirs, names in os.walk(m, topdown=True):
    rel = os.path.relpath(d, m)
    for n in names:
        if not os.path.lexists(os.path.join(new, rel, n)):
            os.unlink(os.path.join(d, n))
    for n in list(dirs):
        if not os.path.lexists(os.path.join(new, rel, n)):
            shutil.rmtree(os.path.join(d, n)); dirs.remove(n)
PY
# (Directory times are the master's own: deleting files changed them, as an install does.)
d=$(rsync -aHc -O -n -i --delete "$NEW/" "$M/" | wc -l)
[ "$d" = 0 ] || { echo "fleet_update: the upgraded master differs from the new release ($d)" >&2; exit 1; }

echo "phase 2: pushing the update ..." >&2
for t in "${TOOL_LIST[@]}"; do
  case $t in
    fleetsync|fleetsync-direct)
      # Not measured: a dry run first, so that neither fleetsync run finds the checksum caches
      # and the page cache warmer than the other (whichever ran first would pay for both).
      FLEETSYNC_FLAGS="${FLEETSYNC_FLAGS:-} -n" run_tool "$t" 2-warm >/dev/null 2>&1 || true;;
  esac
  measure "$t" 2
done

# --- table ---------------------------------------------------------------------------------
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
echo
echo "workload: $PACKAGES"
echo "  old release $O_FILES files, $(mb "$O_BYTES") MB; new release $W_FILES files, $(mb "$W_BYTES") MB; $D_FILES files, $(mb "$D_BYTES") MB new or changed"
echo "load average $LOAD_BEFORE before, $LOAD_AFTER after ($(nproc) cores; other load skews wall and CPU times)"
echo "lab: master, srv, $REMOTES remotes, every link $RATE; $BIN ($("$BIN" --version 2>/dev/null || echo "version unknown"))${FLEETSYNC_FLAGS:+, sync flags: $FLEETSYNC_FLAGS}; agent flags: ${AGENT_FLAGS:-none}${MASTER_FLAGS[*]:+; master: ${MASTER_FLAGS[*]}}"
if [ -n "$LOOPDEV" ]; then echo "trees on a fresh journaled ext4 on $LOOPDEV (LOOPFS=0: the work directory's own)"
else echo "trees on the work directory's file system ($(df -PT "$WORK" | awk 'NR == 2 {print $2}'), LOOPFS=0)"; fi
for phase in 1 2; do
  echo
  [ "$phase" = 1 ] && echo "phase 1: old release to empty remotes" || echo "phase 2: update (old release on the remotes, new on the master)"
  printf '%-17s %7s %13s %18s %17s %13s %17s %17s %13s %16s %6s\n' tool "wall s" "master tx MB" "remote rx MB mean" \
    "remote rx MB max" "master CPU s" "remote CPU s max" "remote CPU s sum" "server CPU s" "server rx/tx MB" diffs
  for t in "${TOOL_LIST[@]}"; do
    printf '%-17s %7s %13s %18s %17s %13s %17s %17s %13s %16s %6s\n' "$t" "${WALL[$t.$phase]}" "$(mb "${TX[$t.$phase]}")" \
      "$(mb "${RXMEAN[$t.$phase]}")" "$(mb "${RXMAX[$t.$phase]}")" "${MCPU[$t.$phase]}" "${RCPU[$t.$phase]}" \
      "${RCPUSUM[$t.$phase]}" "${SCPU[$t.$phase]}" "${SRV[$t.$phase]}" "${DIFFS[$t.$phase]}"
  done
  if [ -n "${WALL[fleetsync.$phase]:-}" ] && [ -n "${WALL[rsync-acz.$phase]:-}" ]; then
    awk -v w1="${WALL[fleetsync.$phase]}" -v w2="${WALL[rsync-acz.$phase]}" \
        -v t1="${TX[fleetsync.$phase]}" -v t2="${TX[rsync-acz.$phase]}" \
        -v r1="${RXMEAN[fleetsync.$phase]}" -v r2="${RXMEAN[rsync-acz.$phase]}" \
        'function q(a, b) { return b > 0 ? sprintf("%.2fx", a / b) : "-" }
         BEGIN { printf "fleetsync / rsync-acz: wall %s, master tx %s, remote rx (mean) %s\n", q(w1, w2), q(t1, t2), q(r1, r2) }'
  fi
done
if [ -n "${SUMMARY:-}" ]; then
  : > "$SUMMARY"
  for phase in 1 2; do
    for t in "${TOOL_LIST[@]}"; do
      echo "$t $phase ${WALL[$t.$phase]} ${TX[$t.$phase]} ${MCPU[$t.$phase]} ${RCPUSUM[$t.$phase]} ${SCPU[$t.$phase]}" >> "$SUMMARY"
    done
  done
fi
[ "$FAILED" = 0 ] || { echo "fleet_update: a run failed or left differences (see above)" >&2; exit 1; }
