#!/usr/bin/env bash
# Build Keel's tiny test guest: a Debian cloud kernel plus a busybox-static
# initramfs whose /init does one scripted action and powers off.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initramfs.cpio.gz and OUTDIR/guest.iso, a
# BIOS-bootable ISO 9660 image (volume id KEEL-GUEST; isolinux, El Torito
# no-emulation) holding the same kernel and initramfs that boots at once,
# without a prompt, into `console=ttyS0 panic=-1 quiet keel.action=vm`.
# Idempotent: when all outputs exist, are newer than every input and were
# built from the same inputs (kernel version, module files, busybox,
# qemu-ga and its libraries, isolinux, this script), it does nothing.
# Needs linux-image-cloud-amd64, busybox-static, cpio, kmod, genisoimage,
# isolinux and syslinux-common; qemu-guest-agent is optional (without it
# the guest has no agent). scripts/install-deps.sh installs them all; root
# is not needed.
#
# Knobs:
#   KEEL_GUEST_KVER=6.1.0-xx-cloud-amd64   use this kernel instead of the newest
#   KEEL_GUEST_QGA=PATH   the qemu-ga to put in the guest (default
#                         /usr/sbin/qemu-ga; "none" leaves the agent out)
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
#                 - starts the QEMU guest agent (qemu-ga, when the build
#                   host had one) in the background on the virtio-serial
#                   port named org.qemu.guest_agent.0 and prints
#                   "KEEL-GUEST AGENT up" once it has the port open ("AGENT
#                   none": no qemu-ga in the guest; "AGENT no-port": no such
#                   port). Its fsfreeze hook prints "KEEL-GUEST FSFREEZE
#                   freeze" before guest-fsfreeze-freeze freezes anything
#                   and "KEEL-GUEST FSFREEZE thaw" after guest-fsfreeze-thaw
#                   (the initramfs has no block-device file system, so
#                   both report 0 file systems);
#                 - echoes each line typed on the serial console back as
#                   "KEEL-GUEST TYPED <line>" (console tests);
#                 - prints KEEL-GUEST-READY;
#                 - then, every ~0.3 s, prints whichever of these changed
#                   (each once at start too):
#                     KEEL-GUEST DISKS vda vdb ...  (/sys/block/vd*, sorted)
#                     KEEL-GUEST CD <label>   ISO9660 volume id on /dev/sr0;
#                                  "none": no drive, no medium or unreadable;
#                                  "?": a medium that is not ISO9660
#                     KEEL-GUEST NICS eth0 eth1 ...
#                 - with keel.writer=N, writes numbered records to /dev/vda
#                   in the background (see writer() below)
#                 It never powers off by itself.
#   nbd-marker    the kernel's own NBD client: brings eth0 up as 10.0.2.15
#                 (QEMU user networking; the host is 10.0.2.2), connects
#                 /dev/nbd0 with `nbd-client -N EXPORT 10.0.2.2 PORT` from
#                 keel.nbd=PORT/EXPORT, does what write-marker does on it,
#                 then disconnects
#   iscsi-marker  the kernel's own iSCSI initiator: brings eth0 up the same
#                 way, logs in with `iscsistart` from
#                 keel.iscsi=PORT,TARGET[,USER,SECRET] (initiator name
#                 iqn.2026-12.io.keel.test:guest), waits for /dev/sda and
#                 does what write-marker does on it
#   script        runs /extra/run.sh, which an extra cpio archive appended to
#                 the initramfs brings (e.g. tests/guest/build-lvm-extra.sh),
#                 its output on the console ("KEEL-GUEST FAIL no
#                 /extra/run.sh" without it)
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
OPTIONAL_MODULES=(nbd iscsi_tcp sd_mod)
# Optional modules only `keel.action=vm` loads (so the other actions boot no
# slower): the ACPI power button and evdev for its /dev/input/eventN, and
# the PIIX IDE controller plus SCSI CD-ROM for an `ide-cd` on the pc machine
# (Debian's cloud kernel builds all of these, and libata, scsi_mod and cdrom
# under them, as modules; ACPI PCI hotplug is built in), and virtio_console
# for the guest agent's virtio-serial port.
VM_MODULES=(button evdev ata_piix sr_mod virtio_console)

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

# The QEMU guest agent and every library it loads (with the dynamic
# loader), each at the path ldd names, for the `vm` action. Optional: without
# qemu-ga (or with a library ldd cannot find) the guest has no agent.
# with_libs BIN: print BIN and every library it loads (with the dynamic
# loader), each at the path ldd names, one per line; fail with ldd's words
# when a library cannot be found.
with_libs() {
    local out
    if ! out="$(ldd "$1" 2>&1)" || grep -q 'not found' <<<"$out"; then
        echo "$out"
        return 1
    fi
    echo "$1"
    # "libx.so.1 => /path (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)";
    # the vDSO has no path.
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' <<<"$out"
}

QGA="${KEEL_GUEST_QGA:-/usr/sbin/qemu-ga}"
QGA_FILES=()
[[ "$QGA" == none || "$QGA" == /* ]] || die "KEEL_GUEST_QGA must be an absolute path or none, not $QGA"
if [[ "$QGA" == none ]]; then
    log "KEEL_GUEST_QGA=none: the guest gets no guest agent"
elif [[ ! -x "$QGA" ]]; then
    log "no $QGA (scripts/install-deps.sh: qemu-guest-agent): the guest gets no guest agent"
    QGA=none
elif ! qga_files="$(with_libs "$QGA")"; then
    log "cannot resolve the libraries of $QGA, the guest gets no guest agent: $qga_files"
    QGA=none
else
    mapfile -t QGA_FILES <<<"$qga_files"
fi

# The kernel's user-space helpers for the network block device actions:
# nbd-client and iscsistart, with their libraries. Optional: without them
# those actions report FAIL.
NET_FILES=()
for bin in /usr/sbin/nbd-client /usr/sbin/iscsistart; do
    if [[ ! -x "$bin" ]]; then
        log "no $bin (scripts/install-deps.sh: nbd-client, open-iscsi): its guest action will fail"
        continue
    fi
    if ! bin_files="$(with_libs "$bin")"; then
        log "cannot resolve the libraries of $bin, left out: $bin_files"
        continue
    fi
    mapfile -t -O "${#NET_FILES[@]}" NET_FILES <<<"$bin_files"
done

# The ISO's boot loader: isolinux.bin and the ldlinux.c32 it loads.
ISOLINUX_BIN=/usr/lib/ISOLINUX/isolinux.bin
LDLINUX_C32=/usr/lib/syslinux/modules/bios/ldlinux.c32
[[ -r "$ISOLINUX_BIN" ]] || die "no $ISOLINUX_BIN (run scripts/install-deps.sh: isolinux)"
[[ -r "$LDLINUX_C32" ]] || die "no $LDLINUX_C32 (run scripts/install-deps.sh: syslinux-common)"
command -v genisoimage >/dev/null || die "no genisoimage (run scripts/install-deps.sh)"

# What the outputs are built from; a different manifest forces a rebuild
# even when the outputs are newer (e.g. after switching kernels).
INPUTS=("$SELF" "$KERNEL" "$BUSYBOX" "${MODFILES[@]}" "${QGA_FILES[@]}" "${NET_FILES[@]}" "$ISOLINUX_BIN"
    "$LDLINUX_C32")
OUTPUTS=("$OUT/vmlinuz" "$OUT/initramfs.cpio.gz" "$OUT/guest.iso")
manifest() {
    printf 'kver %s\n' "$KVER"
    printf 'qga %s\n' "$QGA"
    local f
    for f in "${INPUTS[@]}"; do
        printf '%s %s\n' "$f" "$(stat -L -c '%s %Y' "$f")"
    done
}
MANIFEST="$(manifest)"

up_to_date() {
    local o f
    for o in "${OUTPUTS[@]}" "$OUT/inputs.txt"; do
        [[ -f "$o" ]] || return 1
    done
    [[ "$(cat "$OUT/inputs.txt")" == "$MANIFEST" ]] || return 1
    for o in "${OUTPUTS[@]}"; do
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
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,var,mnt,lib/modules}
ln -s ../run "$ROOT/var/run"
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

# The guest agent: the binary and its libraries (symlinks resolved) at the
# paths ldd named, so its PT_INTERP and the loader's default search path
# (no ld.so.cache) find them; plus the fsfreeze hook, whose stdout qemu-ga
# points at /dev/null, hence the console.
for f in "${QGA_FILES[@]}" "${NET_FILES[@]}"; do
    mkdir -p "$ROOT$(dirname "$f")"
    [[ -e "$ROOT$f" ]] || cp -L "$f" "$ROOT$f"
done
# iscsistart reads its defaults from here; it needs none of them.
mkdir -p "$ROOT/etc/iscsi"
: >"$ROOT/etc/iscsi/iscsid.conf"
if ((${#QGA_FILES[@]} > 0)); then
    ln -s "$QGA" "$ROOT/sbin/keel-qemu-ga"
    cat >"$ROOT/sbin/keel-fsfreeze-hook" <<'HOOK'
#!/bin/sh
# qemu-ga's --fsfreeze-hook (generated by tests/guest/build-guest.sh): runs
# with "freeze" before it freezes and with "thaw" after it thawed.
echo "KEEL-GUEST FSFREEZE $1" >/dev/console
exit 0
HOOK
    chmod 755 "$ROOT/sbin/keel-fsfreeze-hook"
    log "guest agent: ${QGA_FILES[*]}"
fi

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

# The value of kernel command-line word NAME=VALUE.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in
            "$1"=*) echo "${w#*=}" ;;
        esac
    done
}

action="$(arg keel.action)"
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

write_marker() { # [DEV], /dev/vda by default
    dev=${1:-/dev/vda}
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

# --- keel.action=nbd-marker and iscsi-marker --------------------------------

# eth0 as 10.0.2.15/24 behind QEMU's user networking (the host is 10.0.2.2).
net_up() {
    ip link set lo up
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do
        usleep 100000
        i=$((i + 1))
    done
    [ -e /sys/class/net/eth0 ] || { say "FAIL no eth0"; return 1; }
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 ||
        { say "FAIL configuring eth0"; return 1; }
}

nbd_marker() {
    spec="$(arg keel.nbd)"
    port="${spec%%/*}"
    name="${spec#*/}"
    [ -n "$spec" ] || { say "FAIL no keel.nbd=PORT/EXPORT"; return; }
    [ -x /usr/sbin/nbd-client ] || { say "FAIL no nbd-client in the guest"; return; }
    net_up || return
    if ! /usr/sbin/nbd-client -N "$name" 10.0.2.2 "$port" /dev/nbd0 >/tmp/nbd.log 2>&1; then
        say "FAIL nbd-client: $(tr '\n' ' ' </tmp/nbd.log)"
        return
    fi
    say "NBD connected"
    write_marker /dev/nbd0
    /usr/sbin/nbd-client -d /dev/nbd0 >/dev/null 2>&1
}

iscsi_marker() {
    spec="$(arg keel.iscsi)"
    [ -n "$spec" ] || { say "FAIL no keel.iscsi=PORT,TARGET[,USER,SECRET]"; return; }
    [ -x /usr/sbin/iscsistart ] || { say "FAIL no iscsistart in the guest"; return; }
    IFS=, read -r port target user secret <<EOF_SPEC
$spec
EOF_SPEC
    net_up || return
    set -- -i iqn.2026-12.io.keel.test:guest -t "$target" -g 1 -a 10.0.2.2 -p "$port"
    [ -n "$user" ] && set -- "$@" -u "$user" -w "$secret"
    if ! /usr/sbin/iscsistart "$@" >/tmp/iscsi.log 2>&1; then
        say "FAIL iscsistart: $(tr '\n' ' ' </tmp/iscsi.log)"
        return
    fi
    say "ISCSI logged in"
    write_marker /dev/sda
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

# Start the QEMU guest agent in the background on the virtio-serial port
# named org.qemu.guest_agent.0 and print "AGENT up" once it has the port
# open (QEMU's query-chardev then shows the chardev's frontend-open).
# Without udev there is no /dev/virtio-ports/ symlink: the port is the
# /dev/vportNpM whose /sys/class/virtio-ports/vportNpM/name matches.
start_agent() {
    qga=/sbin/keel-qemu-ga
    [ -x $qga ] || { say "AGENT none"; return; }
    port=""
    i=0
    # Port names arrive over virtio-serial's control queue shortly after
    # the driver bound; without a virtio console device (ID 3) wait not at all.
    if grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null; then
        while [ -z "$port" ] && [ $i -lt 50 ]; do
            for p in /sys/class/virtio-ports/*; do
                if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -c "/dev/${p##*/}" ]; then
                    port="/dev/${p##*/}"
                    break
                fi
            done
            [ -n "$port" ] || usleep 100000
            i=$((i + 1))
        done
    fi
    [ -n "$port" ] || { say "AGENT no-port"; return; }
    mkdir -p /run/qemu-ga
    $qga -m virtio-serial -p "$port" -t /run/qemu-ga -f /run/qemu-ga.pid \
        --fsfreeze-hook=/sbin/keel-fsfreeze-hook </dev/null >/run/qemu-ga.log 2>&1 &
    pid=$!
    i=0
    while [ $i -lt 100 ]; do
        if ! kill -0 $pid 2>/dev/null; then
            say "FAIL agent exited: $(tr '\n' ' ' </run/qemu-ga.log)"
            return
        fi
        if ls -l /proc/$pid/fd 2>/dev/null | grep -q " -> $port\$"; then
            say "AGENT up"
            return
        fi
        usleep 50000
        i=$((i + 1))
    done
    say "FAIL agent did not open $port: $(tr '\n' ' ' </run/qemu-ga.log)"
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

# keel.writer=N: write numbered 4 KiB records to /dev/vda, record n at byte
# 4 MiB + n * 4096 ("KEEL-REC <n>", NUL-padded), each made durable (dd
# conv=fsync) before the next, up to N records or until power off; every
# 10 durable records print "KEEL-GUEST REC <count>", and a failed write
# "KEEL-GUEST FAIL write <n>: <error>" (the writer stops).
writer() {
    max="$1"
    n=0
    while [ $n -lt "$max" ]; do
        printf 'KEEL-REC %d\n' $n >/tmp/rec
        if ! dd if=/tmp/rec of=/dev/vda bs=4096 seek=$((1024 + n)) count=1 conv=sync,fsync,notrunc 2>/tmp/w.err; then
            say "FAIL write $n: $(tr '\n' ' ' </tmp/w.err)"
            return
        fi
        n=$((n + 1))
        [ $((n % 10)) -eq 0 ] && say "REC $n"
    done
    say "REC-DONE $n"
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
    start_agent
    # What is typed on the serial console, line by line, said back.
    # (A background job reads /dev/null unless told otherwise.)
    ( while read -r line; do say "TYPED $line"; done ) </dev/console &
    echo "KEEL-GUEST-READY"
    w="$(arg keel.writer)"
    [ -n "$w" ] && [ -b /dev/vda ] && writer "$w" &
    vm_loop
}

case "$action" in
    write-marker) write_marker ;;
    nbd-marker) nbd_marker ;;
    iscsi-marker) iscsi_marker ;;
    script)
        if [ -x /extra/run.sh ]; then /extra/run.sh; else say "FAIL no /extra/run.sh"; fi
        ;;
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

# The ISO: isolinux (with the ldlinux.c32 it loads from its own directory)
# as a 4-sector no-emulation El Torito image, patched with the boot info
# table by genisoimage, and the kernel and initramfs under 8.3 names, so
# plain ISO 9660 lookups find them too. SERIAL copies isolinux's messages
# to the serial console, where a failed boot shows why.
ISO="$WORK/iso"
mkdir -p "$ISO/isolinux"
cp "$ISOLINUX_BIN" "$ISO/isolinux/isolinux.bin"
cp "$LDLINUX_C32" "$ISO/isolinux/ldlinux.c32"
cat >"$ISO/isolinux/isolinux.cfg" <<'CFG'
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT keel
LABEL keel
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0 panic=-1 quiet keel.action=vm
CFG
ln "$WORK/vmlinuz" "$ISO/vmlinuz"
ln "$WORK/initramfs.cpio.gz" "$ISO/initrd.gz"
genisoimage -quiet -input-charset utf-8 -o "$WORK/guest.iso" -V KEEL-GUEST -R \
    -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$ISO" ||
    die "genisoimage failed"
printf '%s\n' "$MANIFEST" >"$WORK/inputs.txt"

# Replace the outputs; inputs.txt last, so an interrupted build never looks
# up to date.
rm -f "$OUT/inputs.txt"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv -f "$WORK/guest.iso" "$OUT/guest.iso"
mv -f "$WORK/inputs.txt" "$OUT/inputs.txt"
log "done: $OUT/vmlinuz $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB) $OUT/guest.iso ($(du -k "$OUT/guest.iso" | cut -f1) KiB)"
