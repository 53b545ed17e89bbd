#!/usr/bin/env bash
# Build Keel's tiny test guest: a Debian cloud kernel plus a busybox-static
# initramfs whose /init does one scripted action and powers off.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. Idempotent: when both
# outputs exist, are newer than every input and were built from the same
# inputs (kernel version, module files, busybox, this script), it does
# nothing. Needs linux-image-cloud-amd64, busybox-static, cpio and kmod
# (scripts/install-deps.sh installs them); root is not needed.
#
# Knobs:
#   KEEL_GUEST_KVER=6.1.0-xx-cloud-amd64   use this kernel instead of the newest
#
# The guest reads `keel.action=ACTION` from the kernel command line:
#   write-marker  write "KEEL-GUEST-MARKER <uptime>" (NUL-padded to 512 bytes)
#                 at sector 2048 of /dev/vda with dd conv=fsync, read it back
#                 past the page cache and print KEEL-GUEST-OK (or
#                 KEEL-GUEST-FAIL <why>)
#   shell         a busybox shell on the console; poweroff when it exits
#   (none)        print KEEL-GUEST-BOOTED
# and always ends with `poweroff -f`, so QEMU (-no-reboot) exits. Every line
# the init prints starts with "KEEL-GUEST".
#
# No filesystem is made: e2fsprogs' mke2fs is only built dynamically linked
# in Debian (only e2fsck has a -static package), and busybox's own mke2fs is
# not the tool we would want to test with, so the guest does raw block I/O.
set -euo pipefail

log() { printf '[build-guest] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

[[ $# == 1 ]] || die "usage: $0 OUTDIR"
OUT="$1"
SELF="$(readlink -f "${BASH_SOURCE[0]}")"

# Required modules first (virtio PCI transport and block device), then the
# optional ones later tests use (guest-side NBD and iSCSI initiators).
REQUIRED_MODULES=(virtio_pci virtio_blk virtio_net)
OPTIONAL_MODULES=(nbd iscsi_tcp)

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
if [[ -n "${KEEL_GUEST_KVER:-}" ]]; then
    KVER="$KEEL_GUEST_KVER"
else
    shopt -s nullglob
    kernels=(/boot/vmlinuz-*-cloud-amd64)
    shopt -u nullglob
    ((${#kernels[@]} > 0)) ||
        die "no /boot/vmlinuz-*-cloud-amd64 (run scripts/install-deps.sh: linux-image-cloud-amd64)"
    KVER="$(printf '%s\n' "${kernels[@]#/boot/vmlinuz-}" | sort -V | tail -n 1)"
fi
KERNEL="/boot/vmlinuz-$KVER"
MODDIR="/lib/modules/$KVER"
[[ -r "$KERNEL" ]] || die "cannot read $KERNEL"
[[ -d "$MODDIR" ]] || die "no $MODDIR"

BUSYBOX=""
for b in /usr/bin/busybox /bin/busybox; do
    if [[ -x "$b" ]] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then
        BUSYBOX="$b"
        break
    fi
done
[[ -n "$BUSYBOX" ]] || die "no statically linked busybox (run scripts/install-deps.sh: busybox-static)"
command -v cpio >/dev/null || die "no cpio (run scripts/install-deps.sh)"
MODPROBE="$(command -v modprobe || echo /sbin/modprobe)"
[[ -x "$MODPROBE" ]] || die "no modprobe (run scripts/install-deps.sh: kmod)"

# Module files in load order (dependencies first, each once).
declare -A seen=()
MODFILES=()
add_module() { # NAME REQUIRED
    local deps line path
    if ! deps="$("$MODPROBE" -S "$KVER" --show-depends "$1" 2>&1)"; then
        [[ "$2" == 1 ]] && die "module $1 not found for $KVER: $deps"
        log "optional module $1 not available for $KVER, skipped"
        return 0
    fi
    while read -r line; do
        case "$line" in
            insmod\ *)
                path="$(awk '{ print $2 }' <<<"$line")"
                if [[ -z "${seen[$path]:-}" ]]; then
                    seen[$path]=1
                    MODFILES+=("$path")
                fi
                ;;
            builtin\ *) ;;
        esac
    done <<<"$deps"
}
for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" 1; done
for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" 0; done

# What the outputs are built from; a different manifest forces a rebuild
# even when the outputs are newer (e.g. after switching kernels).
INPUTS=("$SELF" "$KERNEL" "$BUSYBOX" "${MODFILES[@]}")
manifest() {
    printf 'kver %s\n' "$KVER"
    local f
    for f in "${INPUTS[@]}"; do
        printf '%s %s\n' "$f" "$(stat -L -c '%s %Y' "$f")"
    done
}
MANIFEST="$(manifest)"

up_to_date() {
    local o f
    for o in "$OUT/vmlinuz" "$OUT/initramfs.cpio.gz" "$OUT/inputs.txt"; do
        [[ -f "$o" ]] || return 1
    done
    [[ "$(cat "$OUT/inputs.txt")" == "$MANIFEST" ]] || return 1
    for o in "$OUT/vmlinuz" "$OUT/initramfs.cpio.gz"; do
        for f in "${INPUTS[@]}"; do
            [[ "$o" -nt "$f" ]] || return 1
        done
    done
}

if up_to_date; then
    log "up to date: $OUT ($KVER)"
    exit 0
fi

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------
log "building guest for $KVER into $OUT"
mkdir -p "$OUT"
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

: >"$ROOT/lib/modules/load-order"
for path in "${MODFILES[@]}"; do
    name="$(basename "$path")"
    case "$name" in
        *.ko) cp "$path" "$ROOT/lib/modules/$name" ;;
        *.ko.xz) name="${name%.xz}" && xz -dc "$path" >"$ROOT/lib/modules/$name" ;;
        *.ko.zst) name="${name%.zst}" && zstd -qdc "$path" >"$ROOT/lib/modules/$name" ;;
        *.ko.gz) name="${name%.gz}" && gzip -dc "$path" >"$ROOT/lib/modules/$name" ;;
        *) die "unexpected module file $path" ;;
    esac
    echo "${name%.ko}" >>"$ROOT/lib/modules/load-order"
done
log "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order")"

cat >"$ROOT/init" <<'INIT'
#!/bin/busybox sh
# Keel test guest init (generated by tests/guest/build-guest.sh).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node: reopen it now that devtmpfs is up.
exec </dev/console >/dev/console 2>&1

say() { echo "KEEL-GUEST $*"; }
finish() {
    sync
    say "POWEROFF"
    poweroff -f
    # Not reached; if it were, init exiting panics and panic=-1 reboots,
    # which QEMU's -no-reboot turns into an exit.
    exit 1
}

# Start on a fresh line: the firmware leaves escape codes on the console.
echo
say "INIT $(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

while read -r m; do
    insmod "/lib/modules/$m.ko" || say "WARN insmod $m failed"
done </lib/modules/load-order

action=""
for w in $(cat /proc/cmdline); do
    case "$w" in
        keel.action=*) action="${w#keel.action=}" ;;
    esac
done
say "ACTION ${action:-none}"

wait_for() { # PATH: wait up to 10 s for a device node
    i=0
    while [ ! -b "$1" ] && [ $i -lt 100 ]; do
        usleep 100000
        i=$((i + 1))
    done
    [ -b "$1" ]
}

write_marker() {
    dev=/dev/vda
    wait_for $dev || { say "FAIL no $dev"; return; }
    say "DISK $dev $(blockdev --getsize64 $dev) bytes"
    marker="KEEL-GUEST-MARKER $(cut -d' ' -f1 /proc/uptime)"
    dd if=/dev/zero of=/tmp/sector bs=512 count=1 2>/dev/null
    printf '%s' "$marker" | dd of=/tmp/sector conv=notrunc 2>/dev/null
    if ! dd if=/tmp/sector of=$dev bs=512 seek=2048 count=1 conv=fsync 2>/tmp/dd.err; then
        say "FAIL write: $(cat /tmp/dd.err)"
        return
    fi
    say "WROTE $marker"
    # Read it back from the device, not the page cache.
    blockdev --flushbufs $dev
    echo 3 >/proc/sys/vm/drop_caches
    if ! dd if=$dev of=/tmp/readback bs=512 skip=2048 count=1 2>/tmp/dd.err; then
        say "FAIL read: $(cat /tmp/dd.err)"
        return
    fi
    if cmp -s /tmp/sector /tmp/readback; then
        echo "KEEL-GUEST-OK"
    else
        say "FAIL readback differs"
    fi
}

case "$action" in
    write-marker) write_marker ;;
    shell)
        say "SHELL (exit to power off)"
        setsid cttyhack sh
        ;;
    "") echo "KEEL-GUEST-BOOTED" ;;
    *) say "FAIL unknown action $action" ;;
esac
finish
INIT
chmod 755 "$ROOT/init"

(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -6 >"$WORK/initramfs.cpio.gz"
cp "$KERNEL" "$WORK/vmlinuz"
printf '%s\n' "$MANIFEST" >"$WORK/inputs.txt"

# Replace the outputs; inputs.txt last, so an interrupted build never looks
# up to date.
rm -f "$OUT/inputs.txt"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv -f "$WORK/inputs.txt" "$OUT/inputs.txt"
log "done: $OUT/vmlinuz $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB)"
