#!/usr/bin/env bash
# Keel's NBD server against qemu-nbd and nbdkit, with the same fio client
# (--ioengine=nbd, libnbd), on the same disk, in one run.
#
# Servers (all three run at once, each on its own port, so that every test
# runs qemu-nbd, nbdkit and Keel back to back and drift in the disk's speed
# hits all alike):
#   qemu-nbd  qemu-nbd -f raw --cache=none --aio=io_uring -t -e 4 on a raw
#             file of SIZE (O_DIRECT, io_uring)
#   nbdkit    nbdkit file cache=$NBDKIT_CACHE on another raw file of SIZE
#             (cache=none: buffered I/O, but pages are evicted after each
#             read and written back behind the writes; nbdkit has no
#             O_DIRECT mode)
#   keel      keel-nbd-bench-server: a pool file of 3 x SIZE holding one thin
#             volume of SIZE, written once sequentially, with $SNAPSHOTS
#             snapshots taken afterwards (so every first overwrite of a block
#             is a copy-on-write), served by keel_nbd_server::serve on a
#             tokio runtime of $THREADS worker threads (io_uring + O_DIRECT),
#             with a data cache of $DATA_CACHE MiB: the appliance's default
#             (an eighth of the machine's memory) unless set. qemu-nbd runs
#             with --cache=none and has no cache of its own, so with the
#             default the read rows compare Keel's cache (once warm, a SIZE
#             volume fits in it on a machine of 16 GiB or more) with
#             qemu-nbd's disk reads; DATA_CACHE=0 compares disk with disk.
#             Run both before quoting a read ratio. Keel also has the
#             appliance's write-back of $WRITE_BACK MiB (a write is
#             acknowledged once staged in the data cache and reaches the
#             disk in batches; flushes and FUA writes wait for it);
#             WRITE_BACK=0 writes every block before acknowledging it.
#             Like the appliance, it commits unflushed writes every 5 s.
# The raw files are prefilled with the same fio command (sequential 1 MiB
# writes, io_uring, O_DIRECT), so reads hit written data on all three and
# none of it starts in the page cache.
#
# Tests, each run against the three servers with the same fio options
# (--ioengine=nbd --numjobs=$JOBS, time-based: WARMUP s ramp then RUNTIME s
# measured; the order matters, as writes move Keel's blocks):
#   4 KiB random read,        QD $RAND_QD        target keel >= 1.2 x qemu-nbd
#   $SEQ_BS sequential read,  QD $SEQ_QD         target keel >= 1.2 x qemu-nbd
#   4 KiB random write,       QD $RAND_QD        target keel >= 1.2 x qemu-nbd
#   $SEQ_BS sequential write, QD $SEQ_QD         target keel >= 1.2 x qemu-nbd
# Fairness: fio's nbd engine opens one NBD connection per job; the default
# JOBS=1 means one connection with the whole queue depth on it, for every
# server (qemu-nbd's -e 4 and Keel's multi-conn only matter with JOBS > 1).
# Client and server share the machine's CPUs; the table also shows each
# server's CPU use (percent of one CPU over the fio run, ramp included) and
# the steal time over the run (a busy host makes every figure noisy).
# With DISK=1 each test also runs fio straight on qemu-nbd's raw file
# (io_uring, O_DIRECT, no NBD): the disk's own figure at that queue depth,
# the ceiling for the O_DIRECT servers. About 4 minutes with the defaults.
#
# Environment (defaults in brackets):
#   BENCH_DIR     directory on the disk under test [/var/tmp/keel-bench]; must
#                 not be tmpfs (no O_DIRECT there)
#   SIZE          raw file / volume size [2G]
#   RUNTIME       seconds measured per run [10]
#   WARMUP        seconds of ramp before measuring [2]
#   RAND_QD       queue depth of the 4 KiB random tests [32]
#   SEQ_QD        queue depth of the sequential tests [8]
#   SEQ_BS        block size of the sequential tests [1M]
#   JOBS          fio jobs (= NBD connections) per run [1]
#   SNAPSHOTS     snapshots of Keel's volume [3]
#   THREADS       Keel's tokio worker threads [2]
#   DATA_CACHE    Keel's data cache, MiB; 0 for none [MemTotal / 8]
#   WRITE_BACK    Keel's write-back, MiB; 0 for none [64, the appliance's]
#   NBDKIT_CACHE  nbdkit file plugin cache= mode [none]
#   PORT          first of three TCP ports on 127.0.0.1 [10871]
#   REPEAT        runs per test and server; the table shows the median [1];
#                 each round starts with the next server. On a shared or
#                 virtual disk use REPEAT=3 or more before trusting a ratio
#   KEEP_FILES    1 to keep the data files afterwards [0]
#   DISK          1 to also run each test with fio straight on the raw file
#                 (io_uring, O_DIRECT, no NBD), as a reference [1]
#   KEEL_NBD_SERVER  a prebuilt keel-nbd-bench-server to run instead of
#                 building this tree's (A/B runs of two revisions) [unset]
#
# Every command and its raw output go to $BENCH_DIR/nbd-vs-peers-<time>.log.
set -euo pipefail

SIZE=${SIZE:-2G}
RUNTIME=${RUNTIME:-10}
WARMUP=${WARMUP:-2}
BENCH_DIR=${BENCH_DIR:-/var/tmp/keel-bench}
RAND_QD=${RAND_QD:-32}
SEQ_QD=${SEQ_QD:-8}
SEQ_BS=${SEQ_BS:-1M}
JOBS=${JOBS:-1}
SNAPSHOTS=${SNAPSHOTS:-3}
THREADS=${THREADS:-2}
DATA_CACHE=${DATA_CACHE:-$(awk '$1 == "MemTotal:" { print int($2 / 1024 / 8) }' /proc/meminfo)}
WRITE_BACK=${WRITE_BACK:-64}
NBDKIT_CACHE=${NBDKIT_CACHE:-none}
PORT=${PORT:-10871}
REPEAT=${REPEAT:-1}
KEEP_FILES=${KEEP_FILES:-0}
DISK=${DISK:-1}
TARGET=1.2
EXPORT=bench

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
	echo "nbd-vs-peers: $*" >&2
	exit 1
}

for tool in fio qemu-nbd nbdkit findmnt numfmt; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (build it with libnbd)"

size_bytes=$(numfmt --from=iec "${SIZE%[bB]}") || die "bad SIZE $SIZE"
seq_bs_bytes=$(numfmt --from=iec "${SEQ_BS%[bB]}") || die "bad SEQ_BS $SEQ_BS"
((size_bytes % 1048576 == 0)) || die "SIZE must be a whole number of MiB"
((size_bytes % seq_bs_bytes == 0)) || die "SIZE must be a multiple of SEQ_BS"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer"
[[ $DATA_CACHE =~ ^[0-9]+$ ]] || die "DATA_CACHE must be a number of MiB"
[[ $WRITE_BACK =~ ^[0-9]+$ ]] || die "WRITE_BACK must be a number of MiB"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT + 2 > 65535)); then
	die "bad PORT $PORT"
fi

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
fstype=$(findmnt -n -o FSTYPE -T "$BENCH_DIR")
source_dev=$(findmnt -n -o SOURCE -T "$BENCH_DIR")
case $fstype in
tmpfs | ramfs) die "$BENCH_DIR is on $fstype (memory, no O_DIRECT): set BENCH_DIR to a directory on a real disk" ;;
esac

# Space: two raw files and Keel's pool (3x: the volume, copy-on-write room
# for overwriting what the snapshots hold, slack).
pool_bytes=$((3 * size_bytes))
need=$((2 * size_bytes + pool_bytes))
avail=$(df --output=avail -B1 "$BENCH_DIR" | tail -n 1 | tr -d ' ')
((avail > need)) || die "$BENCH_DIR has $(numfmt --to=iec "$avail") free; this run needs $(numfmt --to=iec "$need")"

names=(qemu-nbd nbdkit keel disk)
ports=("$PORT" $((PORT + 1)) $((PORT + 2)))
for p in "${ports[@]}"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
		die "port $p on 127.0.0.1 is in use: set PORT"
	fi
done

stamp=$(date +%Y%m%d-%H%M%S)
log="$BENCH_DIR/nbd-vs-peers-$stamp.log"
qemu_file="$BENCH_DIR/nbd-qemu.raw"
nbdkit_file="$BENCH_DIR/nbd-nbdkit.raw"
pool="$BENCH_DIR/nbd-keel.pool"
keel_out="$BENCH_DIR/nbd-keel-$stamp.out"

pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -f "$keel_out"
	if [[ $KEEP_FILES != 1 ]]; then
		rm -f "$qemu_file" "$nbdkit_file" "$pool"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${KEEL_NBD_SERVER:-} ]]; then
	# A/B runs: a prebuilt server (e.g. of another revision), no build.
	ks=$KEEL_NBD_SERVER
else
	echo "== building keel-nbd-bench-server (release)"
	(cd "$root" && cargo build --release -p keel-benches --bin keel-nbd-bench-server) 2>&1 | tail -n 2
	target_dir=${CARGO_TARGET_DIR:-$root/target}
	ks="$target_dir/release/keel-nbd-bench-server"
fi
[[ -x $ks ]] || die "$ks was not built"

{
	echo "# nbd-vs-peers $(date -Is)"
	echo "# $(uname -srm); $(nproc) CPUs; $(fio --version); $(qemu-nbd --version | head -n 1); $(nbdkit --version)"
	echo "# BENCH_DIR=$BENCH_DIR ($fstype on $source_dev) SIZE=$SIZE RUNTIME=$RUNTIME WARMUP=$WARMUP JOBS=$JOBS"
	echo "# RAND_QD=$RAND_QD SEQ_QD=$SEQ_QD SEQ_BS=$SEQ_BS SNAPSHOTS=$SNAPSHOTS THREADS=$THREADS DATA_CACHE=$DATA_CACHE WRITE_BACK=$WRITE_BACK NBDKIT_CACHE=$NBDKIT_CACHE REPEAT=$REPEAT"
	rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
	dirty=$(git -C "$root" status --porcelain -- blockstore nbd-server 2>/dev/null | wc -l)
	echo "# keel $rev, blockstore/ and nbd-server/ files changed since: $dirty; load before starting: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$log"

# Start clean: stale files from an interrupted run would change the layout.
rm -f "$qemu_file" "$nbdkit_file" "$pool"

echo "== preparing: two raw files and Keel's pool ($SIZE each, written sequentially)"
for f in "$qemu_file" "$nbdkit_file"; do
	cmd=(fio --name=prefill --filename="$f" --size="$size_bytes" --rw=write --bs=1M --iodepth=8
		--ioengine=io_uring --direct=1 --output-format=terse --terse-version=3)
	echo "\$ ${cmd[*]}" >>"$log"
	"${cmd[@]}" >>"$log" 2>&1 || die "prefilling $f failed (see $log)"
done

# wait_nbd NAME PID PORT: until the server answers an NBD handshake.
wait_nbd() {
	local name=$1 pid=$2 port=$3 i
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || die "$name exited while starting (see $log)"
		if command -v nbdinfo >/dev/null; then
			nbdinfo --size "nbd://127.0.0.1:$port/$EXPORT" >/dev/null 2>&1 && return 0
		elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			return 0
		fi
		sleep 0.2
	done
	die "$name did not start listening on port $port"
}

echo "== starting servers: qemu-nbd :${ports[0]}, nbdkit :${ports[1]}, keel :${ports[2]}"
cmd=(qemu-nbd -f raw --cache=none --aio=io_uring -t -e 4 -x "$EXPORT" -b 127.0.0.1 -p "${ports[0]}" "$qemu_file")
echo "\$ ${cmd[*]}" >>"$log"
"${cmd[@]}" >>"$log" 2>&1 &
pids+=($!)
qemu_pid=$!
wait_nbd qemu-nbd "$qemu_pid" "${ports[0]}"

cmd=(nbdkit -f -i 127.0.0.1 -p "${ports[1]}" --exit-with-parent file "$nbdkit_file" cache="$NBDKIT_CACHE")
echo "\$ ${cmd[*]}" >>"$log"
"${cmd[@]}" >>"$log" 2>&1 &
pids+=($!)
nbdkit_pid=$!
wait_nbd nbdkit "$nbdkit_pid" "${ports[1]}"

cmd=("$ks" --pool "$pool" --create "$pool_bytes" --volume "$EXPORT" --volume-size "$size_bytes"
	--snapshots "$SNAPSHOTS" --threads "$THREADS" --data-cache-mib "$DATA_CACHE" --write-back-mib "$WRITE_BACK" --listen "127.0.0.1:${ports[2]}")
echo "\$ ${cmd[*]}" >>"$log"
"${cmd[@]}" >"$keel_out" 2>>"$log" &
pids+=($!)
keel_pid=$!
for ((i = 0; ; i++)); do
	grep -q '^ready' "$keel_out" 2>/dev/null && break
	kill -0 "$keel_pid" 2>/dev/null || die "keel-nbd-bench-server exited while starting (see $log)"
	((i < 1500)) || die "keel-nbd-bench-server was not ready after 300 s"
	sleep 0.2
done
tee -a "$log" <"$keel_out"
grep -E 'prefilled|snapshots of' "$log" | sed 's/^/   /' || true
server_pids=("$qemu_pid" "$nbdkit_pid" "$keel_pid")

clk_tck=$(getconf CLK_TCK)
# cpu_total: "STEAL TOTAL" jiffies of all CPUs (the host running other
# guests on our virtual CPUs shows as steal).
cpu_total() {
	awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat
}
# cpu_ticks PID: user + system time of every thread of PID, in clock ticks.
cpu_ticks() {
	sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# fio_run SERVER_INDEX RW BS QD -> "IOPS MiB/s SERVER_CPU% FIO_CPU% STEAL%"
# Index 3 is the disk reference: fio straight on qemu-nbd's raw file.
fio_run() {
	local s=$1 rw=$2 bs=$3 qd=$4 target
	if ((s == 3)); then
		target=(--filename="$qemu_file" --size="$size_bytes" --ioengine=io_uring --direct=1)
	else
		target=(--ioengine=nbd --uri="nbd://127.0.0.1:${ports[s]}/$EXPORT")
	fi
	local cmd=(fio --name=nbdcmp "${target[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$JOBS"
		--group_reporting --time_based --runtime="$RUNTIME" --ramp_time="$WARMUP" --norandommap --randrepeat=0
		--output-format=terse --terse-version=3)
	echo "\$ ${cmd[*]}    # ${names[s]}, load $(cut -d' ' -f1 /proc/loadavg)" >>"$log"
	local out t0 t1 c0=0 c1=0 st0 tt0 st1 tt1
	((s == 3)) || c0=$(cpu_ticks "${server_pids[s]}")
	read -r st0 tt0 <<<"$(cpu_total)"
	t0=$(date +%s.%N)
	out=$("${cmd[@]}" 2>>"$log") || die "fio against ${names[s]} failed (see $log)"
	t1=$(date +%s.%N)
	read -r st1 tt1 <<<"$(cpu_total)"
	((s == 3)) || c1=$(cpu_ticks "${server_pids[s]}")
	echo "$out" >>"$log"
	# Terse v3: 7/8 = read KiB/s and IOPS, 48/49 = write KiB/s and IOPS,
	# 88/89 = fio's user and system CPU (percent of one CPU).
	awk -F';' -v c="$((c1 - c0))" -v hz="$clk_tck" -v t0="$t0" -v t1="$t1" \
		-v st="$((st1 - st0))" -v tt="$((tt1 - tt0))" '$1 == "3" {
		printf "%.0f %.1f %.0f %.0f %.0f\n", $8 + $49, ($7 + $48) / 1024, 100 * c / hz / (t1 - t0), $88 + $89,
			(tt > 0 ? 100 * st / tt : 0)
	}' <<<"$out"
}

# median "IOPS ..."... -> the one with the median IOPS
median() {
	printf '%s\n' "$@" | sort -n -k1,1 | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'
}

ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

rows=()
cpu_rows=()
fmt='%-22s %13s %12s %12s %10s %12s %7s %-6s %12s'
cpu_fmt='%-22s %14s %14s %14s %14s'
# measure NAME RW BS QD: REPEAT rounds of qemu-nbd, nbdkit, keel (rotated)
# and the disk reference, back to back.
measure() {
	local name=$1 r s res=() q=() n=() k=() d=()
	local load0
	load0=$(cut -d' ' -f1 /proc/loadavg)
	local order
	for ((r = 0; r < REPEAT; r++)); do
		# Each round starts with the next server, so that with REPEAT=3
		# every server runs first, second and third once.
		order=($((r % 3)) $(((r + 1) % 3)) $(((r + 2) % 3)) 3)
		for s in "${order[@]}"; do
			if ((s < 3)) || [[ $DISK == 1 ]]; then
				res[s]=$(fio_run "$s" "$2" "$3" "$4")
			else
				res[s]="0 0 0 0 0"
			fi
		done
		q+=("${res[0]}")
		n+=("${res[1]}")
		k+=("${res[2]}")
		d+=("${res[3]}")
	done
	local qi qm qc qf qs ni nm nc nf ns ki km kc kf ks di dm df ds
	read -r qi qm qc qf qs <<<"$(median "${q[@]}")"
	read -r ni nm nc nf ns <<<"$(median "${n[@]}")"
	read -r ki km kc kf ks <<<"$(median "${k[@]}")"
	read -r di dm _ df ds <<<"$(median "${d[@]}")"
	if [[ $DISK != 1 ]]; then
		di=- dm=- df=- ds=-
	fi
	local rq rn verdict line
	rq=$(ratio "$ki" "$qi")
	rn=$(ratio "$ki" "$ni")
	# Judged on the exact ratio, not the rounded one printed.
	verdict=$(awk -v k="$ki" -v b="$qi" -v t="$TARGET" 'BEGIN { print (b > 0 && k / b >= t + 0) ? "ok" : "BELOW" }')
	# shellcheck disable=SC2059 # the format is ours
	line=$(printf "$fmt" "$name" "$qi" "$ni" "$ki" "$rq" "$rn" "$TARGET" "$verdict" "$di")
	rows+=("$line")
	echo "$line" | tee -a "$log"
	# shellcheck disable=SC2059
	cpu_rows+=("$(printf "$cpu_fmt" "$name" "$qc/$qf/$qs" "$nc/$nf/$ns" "$kc/$kf/$ks" "-/$df/$ds")")
	echo "   MiB/s: qemu-nbd $qm, nbdkit $nm, keel $km, disk $dm; CPU server/fio: qemu-nbd $qc%/$qf%," \
		"nbdkit $nc%/$nf%, keel $kc%/$kf%, disk -/$df%; steal qemu-nbd $qs%, nbdkit $ns%, keel $ks%, disk $ds%;" \
		"load $load0 -> $(cut -d' ' -f1 /proc/loadavg)" |
		tee -a "$log"
}

echo "== measuring (${WARMUP}s ramp + ${RUNTIME}s per run, $REPEAT run(s) each, JOBS=$JOBS)"
measure "4k randread QD$RAND_QD" randread 4k "$RAND_QD"
measure "$SEQ_BS seq read QD$SEQ_QD" read "$SEQ_BS" "$SEQ_QD"
measure "4k randwrite QD$RAND_QD" randwrite 4k "$RAND_QD"
measure "$SEQ_BS seq write QD$SEQ_QD" write "$SEQ_BS" "$SEQ_QD"

{
	echo
	echo "Keel NBD vs qemu-nbd and nbdkit (fio --ioengine=nbd, $JOBS connection(s)) on $BENCH_DIR ($fstype on $source_dev),"
	echo "SIZE=$SIZE, RUNTIME=${RUNTIME}s, $(nproc) CPUs, Keel volume with $SNAPSHOTS snapshots, load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
	if ((DATA_CACHE > 0)); then
		echo "Keel's data cache: $DATA_CACHE MiB (qemu-nbd: --cache=none, no cache); DATA_CACHE=0 to compare without it"
	else
		echo "Keel's data cache: off (DATA_CACHE=0); every server reads the disk"
	fi
	# shellcheck disable=SC2059
	printf "$fmt\n" test "qemu-nbd IOPS" "nbdkit IOPS" "keel IOPS" "keel/qemu" "keel/nbdkit" target "" "disk IOPS"
	printf '%s\n' "${rows[@]}"
	echo
	echo "CPU over each fio run: server % of one CPU / fio client % of one CPU / steal % of all CPUs (host)"
	# shellcheck disable=SC2059
	printf "$cpu_fmt\n" test qemu-nbd nbdkit keel disk
	printf '%s\n' "${cpu_rows[@]}"
	echo
	echo "target: keel IOPS >= $TARGET x qemu-nbd IOPS on every row; disk IOPS (info): fio --ioengine=io_uring --direct=1"
	echo "on qemu-nbd's raw file, the same job without NBD: what the disk gives at that queue depth"
	echo "log: $log"
} | tee -a "$log"
