#!/usr/bin/env bash
# Make this checkout's kmsfs the system's: commands on PATH, the mount(8) helper, systemd units.
#   tools/install-system.sh              install (links to .venv/bin, units to /etc/systemd/system)
#   tools/install-system.sh --uninstall  remove exactly what install put there
# Run tools/setup.sh first. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="$PWD/.venv/bin"
LINKS=(
    "/usr/local/bin/kmsfs:$VENV_BIN/kmsfs"
    "/usr/local/bin/kmsfs-admin:$VENV_BIN/kmsfs-admin"
    "/usr/local/bin/kmsfs-hsmd:$VENV_BIN/kmsfs-hsmd"
    "/usr/sbin/mount.kmsfs:$VENV_BIN/mount.kmsfs"
    "/usr/local/share/doc/kmsfs:$PWD/docs"
)
UNITS=(systemd/kmsfs@.service systemd/kmsfs-hsmd.service systemd/kmsfs-hsmd.socket)

if [ "${1:-}" = "--uninstall" ]; then
    for pair in "${LINKS[@]}"; do
        link="${pair%%:*}"
        [ -L "$link" ] && [ "$(readlink "$link")" = "${pair#*:}" ] && rm -f "$link"
    done
    for unit in "${UNITS[@]}"; do rm -f "/etc/systemd/system/$(basename "$unit")"; done
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    exit 0
fi

[ -x "$VENV_BIN/kmsfs" ] || { echo "install-system: run tools/setup.sh first" >&2; exit 1; }
mkdir -p /usr/local/share/doc
for pair in "${LINKS[@]}"; do
    ln -sfn "${pair#*:}" "${pair%%:*}"
done
mkdir -p /etc/kmsfs /etc/systemd/system
chmod 0755 /etc/kmsfs
for unit in "${UNITS[@]}"; do install -m 0644 "$unit" /etc/systemd/system/; done
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "install-system: kmsfs, kmsfs-admin, kmsfs-hsmd in /usr/local/bin; mount.kmsfs in /usr/sbin;" \
    "the guides in /usr/local/share/doc/kmsfs;" \
    "kmsfs@.service, kmsfs-hsmd.service and kmsfs-hsmd.socket installed"
