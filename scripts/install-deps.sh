#!/usr/bin/env bash
# Install the Debian packages Keel's build, appliance and tests need.
#
# Idempotent and quick when everything is already there: every package is
# checked with dpkg-query first, and apt-get (including `apt-get update`)
# runs only when something is missing.
#
# Knobs:
#   KEEL_SKIP_DEPS=1   do nothing (for machines where you manage packages yourself)
#   KEEL_TEST_VENV     where the Python test tools go (default /opt/keel-test-venv)
#
# Besides the Debian packages it installs the Python tools the tests run
# (schemathesis, for mgmt/tests/api_fuzz.rs) into a venv at KEEL_TEST_VENV,
# pinned by mgmt/tests/fuzz/requirements.txt; pip runs only when the venv is
# missing or holds other versions than the file pins.
set -euo pipefail

# ---------------------------------------------------------------------------
# The package list. Later issues extend this array.
# An entry "name/backports" is installed from <codename>-backports (the
# backports suite is added to apt's sources when needed); any other entry
# comes from the default suites.
# ---------------------------------------------------------------------------
PACKAGES=(
    # HTTP client in the appliance tests (/metrics)
    curl
    # block store benchmarks (benches/store-vs-fio.sh)
    fio
    # QEMU / VMs. From backports: QEMU 10, never bookworm's 7.2.
    qemu-system-x86/backports
    qemu-utils/backports
    qemu-block-extra/backports
    # The tiny test guest (tests/guest/build-guest.sh): a Debian cloud kernel,
    # busybox-static for the initramfs, cpio to pack it, kmod for module
    # dependency order (modprobe --show-depends).
    linux-image-cloud-amd64
    busybox-static
    cpio
    kmod
    # VM tests: a bootable ISO of the test guest (isolinux, genisoimage) and
    # the real QEMU guest agent in it (fs-freeze for clones and backups).
    isolinux
    syslinux-common
    genisoimage
    qemu-guest-agent
    # NBD clients and a reference NBD server (issue 3)
    libnbd-bin
    nbdkit
    # iSCSI clients and a reference iSCSI target (issue 4)
    libiscsi-bin
    tgt
    # The Linux kernel's own NBD client and iSCSI initiator, run inside the
    # test guest (nbd-client, iscsistart)
    nbd-client
    open-iscsi
    # LVM pools (keel pool create --lvm): lvm2 on the host, and copied into
    # the test guest by tests/guest/build-lvm-extra.sh (mgmt/tests/lvm_pool.rs)
    lvm2
    # The venv of the Python test tools (schemathesis: mgmt/tests/api_fuzz.rs)
    python3-venv
    # The web UI's browser tests (mgmt/tests/web_ui.rs): headless Chromium
    # driven by playwright-core and checked by axe-core, from npm (pinned in
    # mgmt/tests/ui/package-lock.json); no browser download. npm comes
    # with some builds of nodejs (NodeSource's conflicts with Debian's npm):
    # install_ui_test_tools adds Debian's only where there is no npm.
    chromium
    nodejs
    # The cluster's shared state (issue 19): etcd, which the metadata tests
    # (mgmt/tests/meta_backends.rs) start on loopback, and protoc, which the
    # etcd-client crate needs to build its gRPC code
    etcd-server
    protobuf-compiler
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

# The Python test tools: a venv at $KEEL_TEST_VENV with exactly the versions
# of mgmt/tests/fuzz/requirements.txt. The venv keeps a copy of the file it
# was made from; a venv whose copy matches, and whose schemathesis runs, is
# left alone (quick). Only PyPI is needed.
install_test_venv() {
    local venv="${KEEL_TEST_VENV:-/opt/keel-test-venv}"
    local req
    req="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mgmt/tests/fuzz/requirements.txt"
    if [[ -x "$venv/bin/st" ]] && cmp -s "$req" "$venv/keel-requirements.txt" &&
        "$venv/bin/st" --version >/dev/null 2>&1; then
        log "test venv $venv up to date ($("$venv/bin/st" --version))"
        return 0
    fi
    local python=/usr/bin/python3
    [[ -x "$python" ]] || python="$(command -v python3 || true)"
    if [[ -z "$python" ]]; then
        log "error: no python3 for the test venv; install python3-venv, or set KEEL_SKIP_DEPS=1"
        return 1
    fi
    local sudo=()
    if [[ "$(id -u)" != 0 ]] && ! { mkdir -p "$venv" 2>/dev/null && [[ -w "$venv" ]]; }; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            log "error: cannot write $venv and no sudo; set KEEL_TEST_VENV to a writable place"
            return 1
        fi
    fi
    log "installing the Python test tools into $venv ($(grep -E '^schemathesis==' "$req"))"
    if [[ ! -x "$venv/bin/python" ]]; then
        "${sudo[@]}" "$python" -m venv "$venv"
    fi
    "${sudo[@]}" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$req"
    "${sudo[@]}" cp "$req" "$venv/keel-requirements.txt"
    log "test venv ready: $("$venv/bin/st" --version)"
}

# The Node test tools of the browser tests: `npm ci` in mgmt/tests/ui
# (exactly the versions of its package-lock.json) unless node_modules was
# made from the same lock file. Only the npm registry is needed.
install_ui_test_tools() {
    local dir
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mgmt/tests/ui"
    if cmp -s "$dir/package-lock.json" "$dir/node_modules/.keel-lock.json" 2>/dev/null; then
        log "browser test tools in $dir/node_modules up to date"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        log "installing npm"
        if [[ "$(id -u)" == 0 ]]; then
            DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300 install npm
        else
            sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300 install npm
        fi
    fi
    log "installing the browser test tools (npm ci in $dir)"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$dir/node_modules/.keel-lock.json"
}

if [[ "${KEEL_SKIP_DEPS:-0}" == 1 ]]; then
    log "KEEL_SKIP_DEPS=1: skipping package installation"
    exit 0
fi

# Name of the backports suite for this release (bookworm -> bookworm-backports).
CODENAME=""
if [[ -r /etc/os-release ]]; then
    # shellcheck source=/dev/null
    CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
fi
BACKPORTS="${CODENAME:-bookworm}-backports"

# Split the list into the default group and the backports group.
plain=()
backports=()
for entry in "${PACKAGES[@]}"; do
    case "$entry" in
        */backports) backports+=("${entry%/backports}") ;;
        *) plain+=("$entry") ;;
    esac
done

installed_version() {
    # Prints the installed version, or nothing if the package is not fully installed.
    { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } |
        awk '$1 == "ii" { print $2 }'
}

missing_plain=()
for p in "${plain[@]}"; do
    [[ -n "$(installed_version "$p")" ]] || missing_plain+=("$p")
done
missing_bpo=()
for p in "${backports[@]}"; do
    v="$(installed_version "$p")"
    # Installed but not a backports build (e.g. QEMU 7.2): upgrade it too.
    [[ -n "$v" && "$v" == *bpo* ]] || missing_bpo+=("$p")
done

if ((${#missing_plain[@]} == 0 && ${#missing_bpo[@]} == 0)); then
    log "all ${#PACKAGES[@]} packages present"
    install_test_venv
    install_ui_test_tools
    exit 0
fi

missing=("${missing_plain[@]}" "${missing_bpo[@]}")
log "missing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    log "error: apt-get not found; install these packages by hand, or set KEEL_SKIP_DEPS=1"
    exit 1
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "error: not root and no sudo; install the packages above as root, or set KEEL_SKIP_DEPS=1"
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q
    -o Dpkg::Use-Pty=0
    -o DPkg::Lock::Timeout=300
    -o Acquire::Retries=3
    -o APT::Install-Recommends=false
    -o APT::Install-Suggests=false
    -o Dpkg::Options::=--force-confdef
    -o Dpkg::Options::=--force-confold)

# Add the backports suite (same mirror as the main archive) if no source has it.
if ((${#missing_bpo[@]} > 0)); then
    shopt -s nullglob
    if ! grep -Eqs -- "^[^#]*[[:space:]]$BACKPORTS([[:space:]]|\$)" \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        log "adding $BACKPORTS to apt sources"
        "${SUDO[@]}" tee /etc/apt/sources.list.d/keel-backports.sources >/dev/null <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BACKPORTS
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
fi

# No init system runs services here: keep package scripts (tgt's, for one)
# from trying to start them. Only a policy-rc.d we created is removed again.
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\n# added by keel scripts/install-deps.sh\nexit 101\n' |
        "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

log "apt-get update"
"${APT[@]}" update

# Backports first, so nothing from the default suites pulls in an older QEMU.
if ((${#missing_bpo[@]} > 0)); then
    log "installing from $BACKPORTS: ${missing_bpo[*]}"
    "${APT[@]}" install -t "$BACKPORTS" "${missing_bpo[@]}"
fi
if ((${#missing_plain[@]} > 0)); then
    log "installing: ${missing_plain[*]}"
    "${APT[@]}" install "${missing_plain[@]}"
fi

install_test_venv
install_ui_test_tools

log "done"
