#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for kmsfs: system packages (as root) and .venv in the checkout.
# Safe to run again: it installs only what is missing, and makes .venv again (removing it) only
# if it was made with another interpreter than the one chosen below.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(softhsm2 opensc fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev gocryptfs fio attr
          systemd e2fsprogs)  # e2fsprogs: mkfs.ext4 for the power-cut tests (test_fs_powercut.py)

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

# Debian's own python3 unless PYTHON says otherwise: it is built with profile-guided
# optimisation and a static interpreter, and ran the daemon's pure-Python request handling
# 1.4-1.6x faster than a plain `./configure --enable-shared` build such as pyenv's (measured
# here); every FUSE request pays that difference.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3
fi
interpreter_of() { "$1" -c 'import os, sys; print(os.path.realpath(sys.executable))'; }
want="$(interpreter_of "$PYTHON")"
if [ -x .venv/bin/python ]; then
    have="$(interpreter_of .venv/bin/python 2>/dev/null || true)"
    if [ "$have" != "$want" ]; then
        echo "setup: .venv was made with ${have:-a missing interpreter}; making it again with $want"
        rm -rf .venv
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import kmsfs, pkcs11, pyfuse3, trio" || { echo "setup: the venv is broken" >&2; exit 1; }
echo "setup: ready (.venv/bin/kmsfs, .venv/bin/kmsfs-admin)"
