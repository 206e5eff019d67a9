#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for kmsfs: system packages (as root) and .venv in the checkout.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(softhsm2 opensc fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev gocryptfs fio attr)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import kmsfs, pkcs11, pyfuse3, trio" || { echo "setup: the venv is broken" >&2; exit 1; }
echo "setup: ready (.venv/bin/kmsfs, .venv/bin/kmsfs-admin)"
