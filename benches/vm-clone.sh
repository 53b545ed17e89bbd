#!/usr/bin/env bash
# How long `keel vm clone SRC NEW` takes while SRC runs, on a disk that
# holds data, next to the naive way of copying that disk.
#
#   benches/vm-clone.sh
#
# Starts `keel serve` (release build) on a fresh data directory, makes a
# thin volume of $SIZE, fills $FILL of it with data (fio, sequential 1 MiB
# writes over NBD), boots the test guest from it (direct kernel boot,
# keel.action=vm: it writes its marker and idles), and clones the running
# VM $CLONES times. For each clone it records what the daemon measured
# (request to the new VM's QEMU running; how long the source's vCPUs were
# paused for the snapshots) and the CLI's wall time, then deletes the clone
# with its disk. The reference is a full copy of the same volume with
# `qemu-img convert` from NBD to a raw file (what cloning costs without
# copy-on-write). Prints the median of each and the ratio.
#
# Environment (defaults in brackets):
#   BENCH_DIR   where the data directory goes [/var/tmp/keel-bench-clone]
#   SIZE        volume size [10G]
#   FILL        bytes of data written to it [all of SIZE]
#   CLONES      clones to time [5]
#   ACCEL       accelerator for the VMs [tcg]
#   COPY        1 to time the full-copy reference [1]
#   PORT        first of three ports (API, NBD, iSCSI) [17450]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/var/tmp/keel-bench-clone}"
SIZE="${SIZE:-10G}"
FILL="${FILL:-$SIZE}"
CLONES="${CLONES:-5}"
ACCEL="${ACCEL:-tcg}"
COPY="${COPY:-1}"
PORT="${PORT:-17450}"
log() { printf '[vm-clone] %s\n' "$*" >&2; }
# shellcheck source=benches/keel-daemon.sh
source "$ROOT/benches/keel-daemon.sh"

k volume create src-disk --size "$SIZE" >/dev/null
log "filling $FILL of the $SIZE volume"
fio --name=fill --ioengine=nbd --uri="$(nbd_url src-disk)" --rw=write --bs=1M \
    --size="$FILL" --iodepth=8 --refill_buffers=1 >/dev/null
k vm create src --memory 256M --disk src-disk --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" \
    --append "console=ttyS0 panic=-1 quiet keel.action=vm" --start >/dev/null
for _ in $(seq 600); do
    k vm log src | grep -q KEEL-GUEST-READY && break
    sleep 0.2
done
k vm log src | grep -q KEEL-GUEST-READY || { k vm log src; exit 1; }
log "src runs; allocated: $(k --json volume show src-disk | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated_bytes"])') bytes"

TOTALS=() PAUSES=() WALLS=()
for i in $(seq "$CLONES"); do
    t0=$(date +%s%N)
    out="$(k --json vm clone src "c$i")"
    t1=$(date +%s%N)
    read -r total paused state how < <(python3 -c 'import json,sys; v=json.load(sys.stdin); s=v["stats"]; print(s["total_ms"], s["paused_ms"], v["vm"]["state"], s["consistency"])' <<<"$out")
    [[ "$state" == running ]] || { log "clone $i is $state"; exit 1; }
    TOTALS+=("$total") PAUSES+=("$paused") WALLS+=("$(((t1 - t0) / 1000000))")
    log "clone $i: ${total} ms in the daemon, ${paused} ms paused ($how), $(((t1 - t0) / 1000000)) ms wall (CLI)"
    k vm delete "c$i" --disks --force >/dev/null
done
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
CLONE_MS="$(median "${TOTALS[@]}")"
echo "volume $SIZE holding $FILL of data, $CLONES clones of the running VM (median):"
echo "  keel vm clone: $CLONE_MS ms to the new QEMU running (CLI wall $(median "${WALLS[@]}") ms), source paused $(median "${PAUSES[@]}") ms"
if [[ "$COPY" == 1 ]]; then
    t0=$(date +%s%N)
    qemu-img convert -f raw -O raw "$(nbd_url src-disk)" "$BENCH_DIR/copy.raw"
    t1=$(date +%s%N)
    COPY_MS=$(((t1 - t0) / 1000000))
    rm -f "$BENCH_DIR/copy.raw"
    echo "  full copy (qemu-img convert nbd -> raw file): $COPY_MS ms"
    python3 -c "print(f'  ratio: the clone takes {float($CLONE_MS) / $COPY_MS:.4f} x the time of a full copy ({$COPY_MS / float($CLONE_MS):.0f} x faster)')"
fi
