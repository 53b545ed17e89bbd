#!/usr/bin/env bash
# Live backup of a running VM into the appliance library, measured against
# the issue's targets and next to a peer doing the same copy.
#
#   benches/backup.sh
#
# Starts `keel serve` (release build) on a fresh data directory, makes a
# volume of $SIZE filled with mixed content (fio, sequential 1 MiB writes,
# buffers $COMPRESS% compressible, refilled for every write, so there is
# little to dedup within the disk), boots the test guest from it and, while
# it runs:
#   1. full backup            keel vm backup (reads every chunk)
#   2. unchanged incremental  keel vm backup again (nothing changed since 1)
#   3. identical data again   keel appliance create --from-vm on a clone of
#                             the VM (no backup base: a full read), which
#                             finds every chunk already stored
#   then two VMs made from the first backup: the first imports it into
#   the appliance's base volumes, the second is a clone of them
#   4. the peer               qemu-img convert -O qcow2 -c -o
#                             compression_type=zstd from the volume's NBD
#                             URL: a compressed full copy, the usual way to
#                             back up a disk image
# Prints each one's time and rate, the bytes stored, and the ratios.
#
# Environment (defaults in brackets):
#   BENCH_DIR   where the data directory goes [/var/tmp/keel-bench-backup]
#   SIZE        volume size [10G]
#   COMPRESS    fio buffer_compress_percentage [50]
#   PEER        1 to time the qemu-img peer [1]
#   ACCEL       accelerator for the VMs [tcg]
#   PORT        first of three ports (API, NBD, iSCSI) [17460]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/var/tmp/keel-bench-backup}"
SIZE="${SIZE:-10G}"
COMPRESS="${COMPRESS:-50}"
PEER="${PEER:-1}"
PORT="${PORT:-17460}"
log() { printf '[backup] %s\n' "$*" >&2; }
ACCEL="${ACCEL:-tcg}"
# shellcheck source=benches/keel-daemon.sh
source "$ROOT/benches/keel-daemon.sh"
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

k volume create disk --size "$SIZE" >/dev/null
log "filling $SIZE with $COMPRESS% compressible data"
fio --name=fill --ioengine=nbd --uri="$(nbd_url disk)" --rw=write --bs=1M --size="$SIZE" \
    --iodepth=8 --refill_buffers=1 --buffer_compress_percentage="$COMPRESS" --buffer_compress_chunk=4k >/dev/null
k vm create src --memory 256M --disk disk --nic none --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" \
    --append "console=ttyS0 panic=-1 quiet keel.action=vm" --start >/dev/null
for _ in $(seq 600); do
    k vm log src | grep -q "KEEL-GUEST AGENT" && break
    sleep 0.2
done

backup() { # VM APPLIANCE -> "seconds logical read new consistency"
    k --json vm backup "$1" --appliance "$2" |
        json '" ".join(str(v["result"][k]) for k in ("seconds", "logical_bytes", "read_bytes", "new_bytes", "consistency"))'
}

read -r s1 logical read1 new1 how1 < <(backup src full1)
log "full backup: $s1 s, $read1 bytes read, $new1 bytes stored ($how1)"
read -r s2 _ read2 new2 _ < <(backup src incr1)
log "unchanged incremental: $s2 s, $read2 bytes read, $new2 bytes stored"
k vm clone src twin >/dev/null
k vm stop twin --force >/dev/null
t0=$(date +%s%N)
out="$(k --json appliance create dup --from-vm twin)"
t1=$(date +%s%N)
read -r s3 read3 new3 < <(json '" ".join(str(v["result"][k]) for k in ("seconds", "read_bytes", "new_bytes"))' <<<"$out")
log "second full backup of identical data: $s3 s, $read3 bytes read, $new3 bytes new"
stored="$(k --json appliance show full1 | json 'v["stored_bytes"]')"
# VMs from the appliance: the first imports it, the next is a clone.
ms() { python3 -c "print(round(($2 - $1) / 1e6))"; }
t0=$(date +%s%N)
k vm create from1 --from-appliance full1 >/dev/null
t1=$(date +%s%N)
k vm create from2 --from-appliance full1 >/dev/null
t2=$(date +%s%N)
first_ms="$(ms "$t0" "$t1")" next_ms="$(ms "$t1" "$t2")"

echo "volume $SIZE, $COMPRESS% compressible, VM running (consistency: $how1):"
python3 - "$s1" "$logical" "$stored" "$s2" "$s3" "$new3" <<'PY'
import sys
s1, logical, stored, s2, s3, new3 = (float(x) for x in sys.argv[1:])
print(f"  full backup:            {s1:.2f} s, {logical / s1 / 1e6:.0f} MB/s of logical data (target >= 300), stored {stored / logical * 100:.1f}% of logical")
print(f"  unchanged incremental:  {s2:.2f} s (target < 2)")
print(f"  identical data again:   {s3:.2f} s, {new3:.0f} new bytes = {new3 / stored * 100:.3f}% of the first backup's (target < 1%)")
PY
echo "  VM from the appliance:  first (imports) $first_ms ms, next (a clone of its base) $next_ms ms (target < 1 s)"
if [[ "$PEER" == 1 ]]; then
    t0=$(date +%s%N)
    qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$(nbd_url disk)" "$BENCH_DIR/peer.qcow2"
    t1=$(date +%s%N)
    peer_s="$(python3 -c "print(($t1 - $t0) / 1e9)")"
    peer_bytes="$(stat -c %s "$BENCH_DIR/peer.qcow2")"
    rm -f "$BENCH_DIR/peer.qcow2"
    python3 - "$s1" "$logical" "$stored" "$peer_s" "$peer_bytes" <<'PY'
import sys
s1, logical, stored, ps, pb = (float(x) for x in sys.argv[1:])
print(f"  peer (qemu-img convert -c zstd qcow2 over NBD): {ps:.2f} s, {logical / ps / 1e6:.0f} MB/s, {pb / logical * 100:.1f}% of logical")
print(f"  ratio: keel's full backup runs at {ps / s1:.2f} x the peer's speed")
PY
fi
