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
#                 KEEL-GUEST FAIL <why>)
#   shell         a busybox shell on the console; poweroff when it exits
#   vm            long-running, for VM lifecycle tests (QEMU started by the
#                 VM manager, console in a file):
#                 - loads the VM-only modules too (ACPI button, evdev, IDE
#                   CD-ROM);
#                 - waits up to 10 s for /dev/vda and reads sector 2048: if it
#                   holds a marker, prints "KEEL-GUEST SAW <marker>", else
#                   writes "KEEL-GUEST-MARKER <uptime> <random>" like
#                   write-marker does and prints "KEEL-GUEST WROTE <marker>"
#                   (no /dev/vda: "KEEL-GUEST FAIL no /dev/vda", and goes on);
#                 - prints "KEEL-GUEST MAC <iface> <address>" for each ethN;
#                 - arms a power-button watcher: an ACPI power button press
#                   (QMP system_powerdown) prints "KEEL-GUEST ACPI-POWEROFF"
#                   and powers off;
#                 - prints KEEL-GUEST-READY;
#                 - then, every ~0.3 s, prints whichever of these changed
#                   (each once at start too):
#                     KEEL-GUEST DISKS vda vdb ...  (/sys/block/vd*, sorted)
#                     KEEL-GUEST CD <label>   ISO9660 volume id on /dev/sr0;
#                                  "none": no drive, no medium or unreadable;
#                                  "?": a medium that is not ISO9660
#                     KEEL-GUEST NICS eth0 eth1 ...
#                 It never powers off by itself.
#   (none)        print KEEL-GUEST-BOOTED
# and, except for vm, ends with `poweroff -f`, so QEMU (-no-reboot) exits.
# Every line the init prints starts with "KEEL-GUEST".
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
# optional ones later tests use (guest-side NBD and iSCSI initiators). Both
# are loaded for every action.
REQUIRED_MODULES=(virtio_pci virtio_blk virtio_net)
OPTIONAL_MODULES=(nbd iscsi_tcp)
# Optional modules only `keel.action=vm` loads (so the other actions boot no
# slower): the ACPI power button and evdev for its /dev/input/eventN, and
# the PIIX IDE controller plus SCSI CD-ROM for an `ide-cd` on the pc machine
# (Debian's cloud kernel builds all of these, and libata, scsi_mod and cdrom
# under them, as modules; ACPI PCI hotplug is built in).
VM_MODULES=(button evdev ata_piix sr_mod)

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

# Module files in load order (dependencies first, each once); MODLIST says
# which load-order file (base or vm) each goes to.
declare -A seen=() MODLIST=()
MODFILES=()
add_module() { # NAME REQUIRED LIST
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
                    MODLIST[$path]="$3"
                fi
                ;;
            builtin\ *) ;;
        esac
    done <<<"$deps"
}
for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" 1 base; done
for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" 0 base; done
for m in "${VM_MODULES[@]}"; do add_module "$m" 0 vm; done

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
: >"$ROOT/lib/modules/load-order-vm"
for path in "${MODFILES[@]}"; do
    name="$(basename "$path")"
    case "$name" in
        *.ko) cp "$path" "$ROOT/lib/modules/$name" ;;
        *.ko.xz) name="${name%.xz}" && xz -dc "$path" >"$ROOT/lib/modules/$name" ;;
        *.ko.zst) name="${name%.zst}" && zstd -qdc "$path" >"$ROOT/lib/modules/$name" ;;
        *.ko.gz) name="${name%.gz}" && gzip -dc "$path" >"$ROOT/lib/modules/$name" ;;
        *) die "unexpected module file $path" ;;
    esac
    if [[ "${MODLIST[$path]}" == vm ]]; then
        echo "${name%.ko}" >>"$ROOT/lib/modules/load-order-vm"
    else
        echo "${name%.ko}" >>"$ROOT/lib/modules/load-order"
    fi
done
log "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order")"
log "vm-only modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order-vm")"

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

load_modules() { # LOAD-ORDER-FILE
    while read -r m; do
        insmod "/lib/modules/$m.ko" || say "WARN insmod $m failed"
    done <"$1"
}
load_modules /lib/modules/load-order

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

# put_marker DEV MARKER: write MARKER, NUL-padded to 512 bytes (kept in
# /tmp/sector), at sector 2048 of DEV with conv=fsync; print WROTE MARKER.
put_marker() {
    dd if=/dev/zero of=/tmp/sector bs=512 count=1 2>/dev/null
    printf '%s' "$2" | dd of=/tmp/sector conv=notrunc 2>/dev/null
    if ! dd if=/tmp/sector of="$1" bs=512 seek=2048 count=1 conv=fsync 2>/tmp/dd.err; then
        say "FAIL write: $(cat /tmp/dd.err)"
        return 1
    fi
    say "WROTE $2"
}

write_marker() {
    dev=/dev/vda
    wait_for $dev || { say "FAIL no $dev"; return; }
    say "DISK $dev $(blockdev --getsize64 $dev) bytes"
    put_marker $dev "KEEL-GUEST-MARKER $(cut -d' ' -f1 /proc/uptime)" || return
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

# --- keel.action=vm ---------------------------------------------------------

# SAW the marker already at sector 2048 of /dev/vda, or write (WROTE) a new
# one. The marker carries uptime and a random word, so a clone that SAW a
# marker got it from its source's data, not from its own boot.
vm_marker() {
    dev=/dev/vda
    wait_for $dev || { say "FAIL no $dev"; return; }
    if ! dd if=$dev of=/tmp/sector.old bs=512 skip=2048 count=1 2>/tmp/dd.err; then
        say "FAIL read: $(cat /tmp/dd.err)"
        return
    fi
    old="$(tr -d '\000' </tmp/sector.old | head -n 1)"
    case "$old" in
        "KEEL-GUEST-MARKER "*) say "SAW $old" ;;
        *)
            rand="$(cut -c1-8 /proc/sys/kernel/random/uuid)"
            put_marker $dev "KEEL-GUEST-MARKER $(cut -d' ' -f1 /proc/uptime) $rand"
            ;;
    esac
}

# Open the ACPI power button's /dev/input/eventN on fd 3 now (so a press
# right after READY is already queued for us) and wait for an event on it
# in the background: QMP system_powerdown then powers the guest off.
watch_power_button() {
    ev=""
    i=0
    while [ -z "$ev" ] && [ $i -lt 30 ]; do
        for e in /sys/class/input/event*; do
            if [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] && [ -c "/dev/input/${e##*/}" ]; then
                ev="/dev/input/${e##*/}"
                break
            fi
        done
        [ -n "$ev" ] || usleep 100000
        i=$((i + 1))
    done
    [ -n "$ev" ] || { say "FAIL no power button"; return; }
    exec 3<"$ev"
    (
        # evdev hands out whole events (24 bytes on x86_64), never less.
        until dd of=/dev/null bs=24 count=1 <&3 2>/dev/null; do
            say "WARN reading $ev failed"
            sleep 1
        done
        say "ACPI-POWEROFF"
        sync
        poweroff -f
    ) &
    exec 3<&-
}

# Set $medium to the ISO9660 volume identifier (bytes 40..71 of the primary
# volume descriptor at 2048*16, trailing spaces dropped) of the medium in
# /dev/sr0; "none" without a drive or medium, "?" for a non-ISO9660 medium.
# Opening /dev/sr0 is also what makes the kernel notice a media change:
# the first open after one only sees the drive's media event, and a read
# right behind it fails on the drive's pending unit attention (with an I/O
# error on the console); a second open clears that first, without a fork.
medium_state() {
    medium=none
    { true </dev/sr0; } 2>/dev/null
    dd if=/dev/sr0 of=/tmp/pvd bs=8 skip=4096 count=9 2>/dev/null || return
    pvd="$(tr '\000\n' '  ' </tmp/pvd)"
    [ ${#pvd} -eq 72 ] || return
    medium="?"
    [ "${pvd:1:5}" = CD001 ] || return
    medium="${pvd:40:32}"
    medium="${medium%"${medium##*[! ]}"}"
}

# Print DISKS, CD and NICS at start and whenever one changes.
vm_loop() {
    was_disks=- was_medium=- was_nics=-
    while :; do
        disks=""
        for x in /sys/block/vd*; do
            [ -e "$x" ] && disks="$disks ${x##*/}"
        done
        if [ "$disks" != "$was_disks" ]; then
            was_disks="$disks"
            say "DISKS$disks"
        fi
        medium_state
        if [ "$medium" != "$was_medium" ]; then
            was_medium="$medium"
            say "CD $medium"
        fi
        nics=""
        for x in /sys/class/net/eth*; do
            [ -e "$x" ] && nics="$nics ${x##*/}"
        done
        if [ "$nics" != "$was_nics" ]; then
            was_nics="$nics"
            say "NICS$nics"
        fi
        usleep 300000
    done
}

vm() {
    load_modules /lib/modules/load-order-vm
    # Leave the CD-ROM tray to QEMU: our polling opens of /dev/sr0 must not
    # close a tray QMP opened (blockdev-open-tray, eject) nor lock it.
    if [ -d /proc/sys/dev/cdrom ]; then
        echo 0 >/proc/sys/dev/cdrom/autoclose
        echo 0 >/proc/sys/dev/cdrom/lock
    fi
    vm_marker
    for n in /sys/class/net/eth*; do
        [ -e "$n" ] && say "MAC ${n##*/} $(cat "$n/address")"
    done
    watch_power_button
    echo "KEEL-GUEST-READY"
    vm_loop
}

case "$action" in
    write-marker) write_marker ;;
    shell)
        say "SHELL (exit to power off)"
        setsid cttyhack sh
        ;;
    vm) vm ;;
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
