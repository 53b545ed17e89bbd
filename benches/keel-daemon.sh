# Sourced by the whole-system VM benchmarks: builds the release `keel` and
# the test guest, starts `keel serve` on a fresh data directory, and tears
# it all down (daemon, its VMs' QEMUs, the directory) at exit.
#
# Expects ROOT, BENCH_DIR, PORT and ACCEL set; sets KEEL, GUEST, DATA, API,
# NBD_PORT, exports KEEL_API and KEEL_DATA, and defines k (the CLI) and
# nbd_url VOLUME (the volume's URL, access key included).

API="127.0.0.1:$PORT"
NBD_PORT=$((PORT + 1))
cargo build --release -q -p keel-mgmt --manifest-path "$ROOT/Cargo.toml"
KEEL="$ROOT/target/release/keel"
GUEST="$ROOT/target/keel-guest"
bash "$ROOT/tests/guest/build-guest.sh" "$GUEST" >/dev/null 2>&1

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
DATA="$BENCH_DIR/data"
"$KEEL" serve --data "$DATA" --pool-size 64G --api "$API" --nbd "127.0.0.1:$NBD_PORT" \
    --iscsi "127.0.0.1:$((PORT + 2))" --accel "$ACCEL" >"$BENCH_DIR/daemon.log" 2>&1 &
DAEMON=$!
keel_daemon_cleanup() {
    kill "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
    pkill -KILL -f "$DATA/vms/" 2>/dev/null || true
    rm -rf "$BENCH_DIR"
}
trap keel_daemon_cleanup EXIT
for _ in $(seq 100); do
    grep -q "keel is up" "$BENCH_DIR/daemon.log" 2>/dev/null && break
    sleep 0.1
done
grep -q "keel is up" "$BENCH_DIR/daemon.log" || {
    cat "$BENCH_DIR/daemon.log" >&2
    exit 1
}
export KEEL_API="$API" KEEL_DATA="$DATA"
k() { "$KEEL" "$@"; }
nbd_url() { k volume show "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["nbd_url"])'; }
