#!/usr/bin/env bash
# Build the extra initramfs archive for Keel's LVM guest test
# (mgmt/tests/lvm_pool.rs): lvm2, the guest kernel's device-mapper module
# and the keel binary, with a script that runs `keel pool create --lvm` and
# `keel pool grow` for real inside the test guest.
#
#   tests/guest/build-lvm-extra.sh OUT KEEL_BINARY [GUEST_DIR]
#
# OUT is a gzip'd newc cpio archive whose paths are under the guest's root.
# The kernel unpacks concatenated cpio archives in order, so an -initrd that
# is the guest's initramfs.cpio.gz (tests/guest/build-guest.sh) followed by
# OUT boots the guest with these files too; `keel.action=script` then runs
# /extra/run.sh. The archive holds:
#   /usr/bin/keel          KEEL_BINARY without its debug info (strip, when
#                          there is one), with its libraries
#   /sbin/lvm              lvm2 with its libraries (as ldd names them), and
#                          /sbin/{pvcreate,vgcreate,vgs,lvcreate,lvextend,lvs,
#                          lvremove} symlinks to it: Keel runs lvcreate,
#                          lvextend, lvs and lvremove by name from PATH
#   /etc/lvm/lvm.conf      for a guest without udev: LVM makes its own
#                          /dev/mapper nodes, scans /dev/vda only, keeps no
#                          metadata backups and runs no dmeventd
#   /extra/modules/        dm-mod of the guest's kernel and its dependencies,
#                          decompressed, with load-order (dependencies first)
#   /extra/run.sh          the test (below); every line it prints starts with
#                          "KEEL-LVM": one per step, "KEEL-LVM FAIL <why>" on
#                          the first failure (then the tail of keel's log,
#                          and it stops), "KEEL-LVM OK" at the end
#
# The kernel is the one the guest was built with: the `kver` line of
# GUEST_DIR/inputs.txt when GUEST_DIR is given, else chosen the way
# build-guest.sh chooses it (KEEL_GUEST_KVER, or the newest
# /boot/vmlinuz-*-cloud-amd64). Needs lvm2, cpio and kmod
# (scripts/install-deps.sh installs them); root is not needed.
#
# The test guest has a 512 MiB raw virtio disk (/dev/vda) for the volume
# group; keel's data directory, with its default pool file, is on the
# initramfs (tmpfs, where the store falls back to buffered I/O: it has no
# O_DIRECT), and the LVM pool on the logical volume uses O_DIRECT.
set -euo pipefail

log() { printf '[build-lvm-extra] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[[ $# == 2 || $# == 3 ]] || die "usage: $0 OUT KEEL_BINARY [GUEST_DIR]"
OUT="$1"
KEEL="$2"
GUEST_DIR="${3:-}"
[[ -x "$KEEL" ]] || die "no keel binary at $KEEL"

if [[ -n "$GUEST_DIR" ]]; then
    [[ -r "$GUEST_DIR/inputs.txt" ]] || die "no $GUEST_DIR/inputs.txt: build the guest first (tests/guest/build-guest.sh)"
    KVER="$(awk '$1 == "kver" { print $2 }' "$GUEST_DIR/inputs.txt")"
    [[ -n "$KVER" ]] || die "no kver line in $GUEST_DIR/inputs.txt"
elif [[ -n "${KEEL_GUEST_KVER:-}" ]]; then
    KVER="$KEEL_GUEST_KVER"
else
    shopt -s nullglob
    kernels=(/boot/vmlinuz-*-cloud-amd64)
    shopt -u nullglob
    ((${#kernels[@]} > 0)) ||
        die "no /boot/vmlinuz-*-cloud-amd64 (run scripts/install-deps.sh: linux-image-cloud-amd64)"
    KVER="$(printf '%s\n' "${kernels[@]#/boot/vmlinuz-}" | sort -V | tail -n 1)"
fi
[[ -d "/lib/modules/$KVER" ]] || die "no /lib/modules/$KVER"

LVM=""
for b in /sbin/lvm /usr/sbin/lvm; do
    if [[ -x "$b" ]]; then
        LVM="$b"
        break
    fi
done
[[ -n "$LVM" ]] || die "no lvm binary (/sbin/lvm or /usr/sbin/lvm): run scripts/install-deps.sh (lvm2)"
command -v cpio >/dev/null || die "no cpio (run scripts/install-deps.sh)"
MODPROBE="$(command -v modprobe || echo /sbin/modprobe)"
[[ -x "$MODPROBE" ]] || die "no modprobe (run scripts/install-deps.sh: kmod)"

# with_libs BIN: print BIN and every library it loads (with the dynamic
# loader), each at the path ldd names, one per line; fail with ldd's words
# when a library cannot be found. (As in build-guest.sh.)
with_libs() {
    local out
    if ! out="$(ldd "$1" 2>&1)" || grep -q 'not found' <<<"$out"; then
        echo "$out"
        return 1
    fi
    echo "$1"
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' <<<"$out"
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/keel-lvm-extra.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"/{sbin,usr/bin,etc/lvm,run/lock,extra/modules}

# Libraries at the paths ldd named (the guest has no ld.so.cache), the
# binaries at fixed places on the guest's PATH.
copy_libs() { # BIN
    local files f
    files="$(with_libs "$1")" || die "cannot resolve the libraries of $1: $files"
    while read -r f; do
        [[ "$f" == "$1" ]] && continue
        mkdir -p "$ROOT$(dirname "$f")"
        [[ -e "$ROOT$f" ]] || cp -L "$f" "$ROOT$f"
    done <<<"$files"
}
copy_libs "$KEEL"
if command -v strip >/dev/null; then
    strip --strip-debug -o "$ROOT/usr/bin/keel" "$KEEL"
else
    cp -L "$KEEL" "$ROOT/usr/bin/keel"
fi
copy_libs "$LVM"
cp -L "$LVM" "$ROOT/sbin/lvm"
for c in pvcreate vgcreate vgs lvcreate lvextend lvs lvremove; do
    ln -s lvm "$ROOT/sbin/$c"
done

# No udev in the guest: libdevmapper makes the /dev/mapper nodes itself.
cat >"$ROOT/etc/lvm/lvm.conf" <<'CONF'
# Keel's LVM test guest (generated by tests/guest/build-lvm-extra.sh).
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
    filter = [ "a|^/dev/vda$|", "r|.*|" ]
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
}
global {
    use_lvmlockd = 0
    locking_dir = "/run/lock/lvm"
}
backup {
    backup = 0
    archive = 0
}
CONF

# dm-mod and what it needs, dependencies first.
: >"$ROOT/extra/modules/load-order"
deps="$("$MODPROBE" -S "$KVER" --show-depends dm-mod 2>&1)" || die "module dm-mod not found for $KVER: $deps"
while read -r line; do
    case "$line" in
        insmod\ *)
            path="$(awk '{ print $2 }' <<<"$line")"
            name="$(basename "$path")"
            case "$name" in
                *.ko) cp "$path" "$ROOT/extra/modules/$name" ;;
                *.ko.xz) name="${name%.xz}" && xz -dc "$path" >"$ROOT/extra/modules/$name" ;;
                *.ko.zst) name="${name%.zst}" && zstd -qdc "$path" >"$ROOT/extra/modules/$name" ;;
                *.ko.gz) name="${name%.gz}" && gzip -dc "$path" >"$ROOT/extra/modules/$name" ;;
                *) die "unexpected module file $path" ;;
            esac
            echo "${name%.ko}" >>"$ROOT/extra/modules/load-order"
            ;;
        builtin\ *) ;;
    esac
done <<<"$deps"
log "kernel $KVER, modules: $(tr '\n' ' ' <"$ROOT/extra/modules/load-order")"

cat >"$ROOT/extra/run.sh" <<'RUN'
#!/bin/sh
# Keel's LVM pool test inside the test guest (generated by
# tests/guest/build-lvm-extra.sh; run by keel.action=script).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# NO_COLOR: keel's log, shown on a failure, without ANSI colours.
export KEEL_DATA=/tmp/keel LVM_SUPPRESS_FD_WARNINGS=1 NO_COLOR=1
MIB=1048576
KEEL_PID=""

step() { echo "KEEL-LVM $*"; }
fail() {
    echo "KEEL-LVM FAIL $*"
    if [ -s /tmp/keel.log ]; then
        tail -n 30 /tmp/keel.log | sed 's/^/KEEL-LVM-LOG /'
    fi
    exit 1
}
# run CMD...: run it, its output in /tmp/out; fail with that output.
run() {
    "$@" >/tmp/out 2>&1 || fail "$*: $(tr '\n' ' ' </tmp/out)"
}
# A number from the pretty-printed JSON in /tmp/out: json_field KEY.
json_field() {
    sed -n "s/^ *\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" /tmp/out | head -n 1
}
lv_bytes() {
    lvs --noheadings --units b --nosuffix -o lv_size vg0/keel-lv1 2>/tmp/lvs.err | tr -d ' '
}

start_keel() {
    keel serve --data /tmp/keel --pool-size 64M >/tmp/keel.log 2>&1 &
    KEEL_PID=$!
    i=0
    while ! grep -q '^keel is up' /tmp/keel.log; do
        kill -0 $KEEL_PID 2>/dev/null || fail "keel serve exited"
        [ $i -lt 1200 ] || fail "keel serve not up after 120 s"
        usleep 100000
        i=$((i + 1))
    done
}
stop_keel() {
    kill -TERM $KEEL_PID
    wait $KEEL_PID
    rc=$?
    [ $rc -eq 0 ] || fail "keel serve exited with $rc after SIGTERM"
    KEEL_PID=""
}

# The pool's JSON in /tmp/out; checks it is online.
show_pool() {
    run keel --json pool show lv1
    state="$(json_field state)"
    total="$(json_field total_bytes)"
    alloc="$(json_field allocated_bytes)"
    [ "$state" = online ] || fail "pool lv1 is $state: $(tr '\n' ' ' </tmp/out)"
}

# Connect /dev/nbd0 to v1 by its nbd_url (nbd://HOST:PORT/EXPORT).
nbd_connect() {
    run keel --json volume show v1
    url="$(json_field nbd_url)"
    hostport="${url#nbd://}"
    exp_name="${hostport#*/}"
    hostport="${hostport%%/*}"
    { [ -n "$exp_name" ] && [ "$hostport" != "$url" ]; } || fail "no nbd_url in $(tr '\n' ' ' </tmp/out)"
    run /usr/sbin/nbd-client -N "$exp_name" "${hostport%:*}" "${hostport##*:}" /dev/nbd0
    size="$(blockdev --getsize64 /dev/nbd0)"
    [ "$size" = $((200 * MIB)) ] || fail "/dev/nbd0 is $size bytes, not 200 MiB"
}
nbd_disconnect() {
    run /usr/sbin/nbd-client -d /dev/nbd0
}
# md5 of the first N MiB of /dev/nbd0, read past the page cache.
nbd_md5() {
    blockdev --flushbufs /dev/nbd0
    echo 3 >/proc/sys/vm/drop_caches
    dd if=/dev/nbd0 bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1
}

# --- device-mapper, loopback, volume group ------------------------------
while read -r m; do
    insmod "/extra/modules/$m.ko" || fail "insmod $m"
done </extra/modules/load-order
i=0
while [ ! -c /dev/mapper/control ] && [ $i -lt 50 ]; do
    usleep 100000
    i=$((i + 1))
done
[ -c /dev/mapper/control ] || fail "no /dev/mapper/control after loading dm-mod"
step "DM $(tr '\n' ' ' </extra/modules/load-order)loaded"

ip link set lo up || fail "ip link set lo up"
step "LO up"

[ -b /dev/vda ] || fail "no /dev/vda"
run pvcreate /dev/vda
run vgcreate vg0 /dev/vda
step "VG vg0 $(vgs --noheadings --units b --nosuffix -o vg_size vg0 | tr -d ' ') bytes"

# --- keel and the LVM pool ----------------------------------------------
start_keel
step "KEEL up"

run keel pool create lv1 --lvm vg0 --size 64M --tier fast
lv="$(lv_bytes)"
[ "$lv" = $((64 * MIB)) ] || fail "lvs: vg0/keel-lv1 is ${lv:-missing} bytes, not 64 MiB: $(cat /tmp/lvs.err)"
show_pool
{ [ "$(json_field vg)" = vg0 ] && [ "$(json_field lv)" = keel-lv1 ]; } || fail "pool lv1 not on vg0/keel-lv1: $(tr '\n' ' ' </tmp/out)"
[ "$(json_field tier)" = fast ] || fail "pool lv1 has tier $(json_field tier)"
path="$(json_field path)"
[ -b "$path" ] || fail "pool lv1's path $path is not a block device"
{ [ "$total" -le $((64 * MIB)) ] && [ "$total" -gt $((56 * MIB)) ]; } ||
    fail "pool lv1 has $total bytes, not a little under 64 MiB"
small_total=$total
step "POOL lv1 online on $path lv=$lv total=$total"

# --- a volume, 32 MiB of data -------------------------------------------
run keel volume create v1 --size 200M --pool lv1
nbd_connect
step "NBD v1 connected ($exp_name)"
dd if=/dev/urandom of=/tmp/a bs=1M count=32 2>/dev/null || fail "dd from /dev/urandom"
sum_a="$(md5sum </tmp/a | cut -d' ' -f1)"
dd if=/tmp/a of=/dev/nbd0 bs=1M conv=fsync 2>/tmp/dd.err || fail "writing 32 MiB to /dev/nbd0: $(cat /tmp/dd.err)"
got="$(nbd_md5 32)"
[ "$got" = "$sum_a" ] || fail "read back 32 MiB: md5 $got, wrote $sum_a"
nbd_disconnect
show_pool
step "WROTE 32 MiB md5=$sum_a allocated=$alloc"

# --- grow the LV and the pool online ------------------------------------
run keel pool grow lv1 --size 256M
lv="$(lv_bytes)"
[ "$lv" = $((256 * MIB)) ] || fail "lvs: vg0/keel-lv1 is ${lv:-missing} bytes after grow, not 256 MiB"
show_pool
{ [ "$total" -gt $((200 * MIB)) ] && [ "$total" -le $((256 * MIB)) ]; } ||
    fail "pool lv1 has $total bytes after growing to 256 MiB (was $small_total)"
step "GROWN lv=$lv total=$total (was $small_total)"

# 100 MiB more after the first 32: 132 MiB, more than 64 MiB could hold.
nbd_connect
dd if=/dev/urandom of=/tmp/b bs=1M count=100 2>/dev/null || fail "dd from /dev/urandom"
dd if=/tmp/b of=/dev/nbd0 bs=1M seek=32 conv=fsync 2>/tmp/dd.err ||
    fail "writing 100 MiB at 32 MiB to /dev/nbd0: $(cat /tmp/dd.err)"
sum_all="$(cat /tmp/a /tmp/b | md5sum | cut -d' ' -f1)"
got="$(nbd_md5 132)"
[ "$got" = "$sum_all" ] || fail "read back 132 MiB: md5 $got, wrote $sum_all"
nbd_disconnect
show_pool
[ "$alloc" -gt $((64 * MIB)) ] || fail "pool lv1 allocates only $alloc bytes after writing 132 MiB"
step "WROTE 132 MiB md5=$sum_all allocated=$alloc"

# --- restart: the pool comes back with the data -------------------------
stop_keel
start_keel
show_pool
[ "$total" -gt $((200 * MIB)) ] || fail "pool lv1 has $total bytes after the restart"
nbd_connect
got="$(nbd_md5 132)"
[ "$got" = "$sum_all" ] || fail "after the restart, 132 MiB read back with md5 $got, wrote $sum_all"
nbd_disconnect
step "RESTARTED pool lv1 online total=$total md5=$got"

# --- remove it all ------------------------------------------------------
run keel volume delete v1
run keel pool remove lv1
lvs --noheadings -o lv_name vg0 >/tmp/out 2>&1 || fail "lvs vg0: $(tr '\n' ' ' </tmp/out)"
if grep -qw keel-lv1 /tmp/out; then
    fail "vg0/keel-lv1 is still there after keel pool remove lv1: $(tr '\n' ' ' </tmp/out)"
fi
step "REMOVED v1, lv1 and vg0/keel-lv1"
stop_keel
step "OK"
RUN
chmod 755 "$ROOT/extra/run.sh"

mkdir -p "$(dirname "$OUT")"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -1 >"$WORK/extra.cpio.gz"
mv -f "$WORK/extra.cpio.gz" "$OUT"
log "done: $OUT ($(du -k "$OUT" | cut -f1) KiB)"
