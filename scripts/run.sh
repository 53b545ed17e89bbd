#!/usr/bin/env bash
# Bring the Keel appliance up with embedded defaults.
#
#   scripts/run.sh [keel serve options...]     e.g. scripts/run.sh --data /srv/keel
#
# Installs what it needs, builds the release binary, then runs
# `keel serve` in the foreground (data directory: ./keel-data by default).
set -euo pipefail

cd "$(dirname "$0")/.."

echo "==> Installing dependencies (scripts/install-deps.sh)"
bash scripts/install-deps.sh

echo "==> Building keel (cargo build --release -p keel-mgmt)"
cargo build --release -p keel-mgmt

echo "==> Starting: target/release/keel serve $*"
exec target/release/keel serve "$@"
