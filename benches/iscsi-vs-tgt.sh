#!/usr/bin/env bash
# Keel's iSCSI target against tgt (Linux SCSI target framework, user space),
# with the same user-space initiators, on the same disk, in one run.
#
# Servers (both run at once, each on its own port, so every test runs them
# back to back and drift in the disk's speed hits both alike):
#   tgt   tgtd serving a raw file of SIZE as LUN 1 (backing store rdwr,
#         tgt's default: buffered pread/pwrite from a thread pool, so its
#         reads come from the page cache once warm and its writes land in
#         it; TGT_DIRECT=1 opens the file with O_DIRECT instead, as Keel's
#         store does)
#   keel  keel-nbd-bench-server --iscsi: a pool file of 3 x SIZE holding one
#         thin volume of SIZE (written once sequentially before the run, no
#         snapshots), io_uring + O_DIRECT, served as LUN 0 of
#         iqn.2026-11.io.keel:bench on a tokio runtime of $THREADS threads,
#         with write-back of up to $WRITE_BACK MiB (the appliance's default:
#         a write is acknowledged once staged in the data cache and reaches
#         the disk in batches; a flush waits for it) and a data cache of
#         $DATA_CACHE MiB (the appliance's default, an
#         eighth of memory, unless set; 0 for none); like the appliance,
#         it commits unflushed writes every 5 s
# tgt's raw file is prefilled with random data (dd, 1 MiB blocks) so reads
# hit written data on both, and the page cache is dropped before the run.
#
# Tests (the issue's figures), each against both targets:
#   4 KiB random read, QD 32    iscsi-perf -r -m 32 -b 8 -t RUNTIME   (IOPS)
#   4 KiB random write, QD 32   qemu-img bench -w -t none -d 32 -s 4k
#                               -S 32436224 -c $WRITE_COUNT (a 31 MiB odd
#                               step: offsets jump around the whole LUN)
#   1 MiB sequential write, QD 8  qemu-img bench -w -t none -d 8 -s 1M
#                               -c $SEQ_COUNT
# After every run the script calls sync (not timed), so that tgt's
# buffered writes are written back before the next run rather than during
# it. Target: keel >= 1.5 x tgt on each. The table gives IOPS (or MiB/s) per
# target, the ratio, and each test's median over REPEAT rounds.
#
# Environment (defaults in brackets):
#   BENCH_DIR    directory on the disk under test [/var/tmp/keel-iscsi-bench]
#   SIZE         LUN size [2G]
#   RUNTIME      seconds per iscsi-perf run [10]
#   WRITE_COUNT  4 KiB writes per qemu-img bench run [100000]
#   SEQ_COUNT    1 MiB writes per qemu-img bench run [2048]
#   THREADS      Keel's tokio worker threads [2]
#   DATA_CACHE   Keel's data cache, MiB; 0 for none [MemTotal / 8]
#   WRITE_BACK   Keel's write-back, MiB; 0 for none [64]
#   REPEAT       rounds; the table shows medians [3]
#   PORT         first of two TCP ports on 127.0.0.1 [3270]
#   TGT_DIRECT   1 to run tgt's backing store with O_DIRECT [0]
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/var/tmp/keel-iscsi-bench}
SIZE=${SIZE:-2G}
RUNTIME=${RUNTIME:-10}
WRITE_COUNT=${WRITE_COUNT:-100000}
SEQ_COUNT=${SEQ_COUNT:-2048}
THREADS=${THREADS:-2}
DATA_CACHE=${DATA_CACHE:-$(awk '$1 == "MemTotal:" { print int($2 / 1024 / 8) }' /proc/meminfo)}
WRITE_BACK=${WRITE_BACK:-64}
REPEAT=${REPEAT:-3}
PORT=${PORT:-3270}
TGT_DIRECT=${TGT_DIRECT:-0}
TGT_PORT=$((PORT + 1))

for tool in tgtd tgtadm iscsi-perf qemu-img; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-deps.sh" >&2; exit 1; }
done
if pgrep -x tgtd >/dev/null; then
    echo "a tgtd is already running; stop it first (it ignores SIGTERM: kill -9)" >&2
    exit 1
fi

cargo build --release -q -p keel-benches --bin keel-nbd-bench-server
mkdir -p "$BENCH_DIR"
size_bytes=$(numfmt --from=iec "$SIZE")
tgt_file="$BENCH_DIR/tgt.raw"
keel_pool="$BENCH_DIR/keel-pool.img"
rm -f "$tgt_file" "$keel_pool"
echo "prefilling tgt's file ($SIZE)..." >&2
dd if=/dev/urandom of="$tgt_file" bs=1M count=$((size_bytes >> 20)) status=none conv=fsync

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$tgt_file" "$keel_pool"
}
trap cleanup EXIT

target/release/keel-nbd-bench-server --pool "$keel_pool" --create $((size_bytes * 3)) --volume-size "$size_bytes" \
    --snapshots 0 --threads "$THREADS" --data-cache-mib "$DATA_CACHE" --write-back-mib "$WRITE_BACK" --listen "127.0.0.1:$((PORT + 100))" --iscsi "127.0.0.1:$PORT" \
    >"$BENCH_DIR/keel.out" 2>"$BENCH_DIR/keel.err" &
pids+=($!)
for _ in $(seq 600); do grep -q "^ready iscsi" "$BENCH_DIR/keel.out" 2>/dev/null && break; sleep 0.5; done
grep -q "^ready iscsi" "$BENCH_DIR/keel.out" || { cat "$BENCH_DIR/keel.err" >&2; exit 1; }

tgtd -f --iscsi "portal=127.0.0.1:$TGT_PORT" >"$BENCH_DIR/tgt.log" 2>&1 &
pids+=($!)
sleep 1
tgtadm --lld iscsi --op new --mode target --tid 1 -T iqn.2026-11.test:tgt
tgt_flags=()
if [[ $TGT_DIRECT == 1 ]]; then tgt_flags=(--bsoflags direct); fi
tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$tgt_file" "${tgt_flags[@]}"
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
sync
echo 3 >/proc/sys/vm/drop_caches || true

keel_url="iscsi://127.0.0.1:$PORT/iqn.2026-11.io.keel:bench/0"
tgt_url="iscsi://127.0.0.1:$TGT_PORT/iqn.2026-11.test:tgt/1"

# One measurement: prints a number (IOPS or MiB/s).
measure() {
    local test=$1 url=$2 out
    case $test in
    randread)
        out=$(iscsi-perf -r -m 32 -b 8 -t "$RUNTIME" "$url" 2>&1 | tr '\r' '\n')
        grep -oE 'iops average [0-9]+' <<<"$out" | tail -1 | awk '{print $3}'
        ;;
    randwrite)
        out=$(qemu-img bench -w -f raw -t none -d 32 -s 4k -S 32436224 -c "$WRITE_COUNT" "$url" 2>&1)
        secs=$(grep -oE 'completed in [0-9.]+' <<<"$out" | awk '{print $3}')
        awk -v n="$WRITE_COUNT" -v s="$secs" 'BEGIN { printf "%.0f\n", n / s }'
        ;;
    seqwrite)
        out=$(qemu-img bench -w -f raw -t none -d 8 -s 1M -c "$SEQ_COUNT" "$url" 2>&1)
        secs=$(grep -oE 'completed in [0-9.]+' <<<"$out" | awk '{print $3}')
        awk -v n="$SEQ_COUNT" -v s="$secs" 'BEGIN { printf "%.0f\n", n / s }'
        ;;
    esac
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

declare -A results
for round in $(seq "$REPEAT"); do
    for test in randread randwrite seqwrite; do
        if ((round % 2)); then order="keel tgt"; else order="tgt keel"; fi
        for who in $order; do
            if [[ $who == keel ]]; then url=$keel_url; else url=$tgt_url; fi
            v=$(measure "$test" "$url")
            # tgt's buffered writes reach the disk later (kernel writeback,
            # up to 30 s on): flush them now, untimed, so that they do not
            # land in the next run, which is often Keel's.
            sync
            echo "round $round $test $who: $v" >&2
            results[$test.$who]+="$v "
        done
    done
done

printf '\n%-28s %12s %12s %8s\n' test keel tgt ratio
for test in randread randwrite seqwrite; do
    k=$(tr ' ' '\n' <<<"${results[$test.keel]}" | grep . | median)
    t=$(tr ' ' '\n' <<<"${results[$test.tgt]}" | grep . | median)
    case $test in
    randread) label="4K random read QD32 (IOPS)" ;;
    randwrite) label="4K random write QD32 (IOPS)" ;;
    seqwrite) label="1M seq write QD8 (MiB/s)" ;;
    esac
    printf '%-28s %12s %12s %8s\n' "$label" "$k" "$t" "$(awk -v a="$k" -v b="$t" 'BEGIN { printf "%.2f", a / b }')"
done
echo "(medians of $REPEAT rounds; tgt O_DIRECT: $TGT_DIRECT; Keel data cache: $DATA_CACHE MiB, write-back: $WRITE_BACK MiB; target keel/tgt >= 1.5)"
