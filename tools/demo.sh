#!/usr/bin/env bash
# The main job, non-interactive, on the embedded SoftHSM2 default:
# a key ceremony (store, HSMs, operators, a quorum Trust, a Domain), then an encrypted mount.
# tools/setup.sh (Debian packages, .venv in the checkout) is the only set-up; the demo itself
# writes only under $DEMO_DIR (default: a new temporary directory): the store and its tokens,
# the volume, the mount point, the mount's log and its rollback records (KMSFS_STATE_DIR, which
# for root would otherwise be /var/lib/kmsfs/state).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

DEMO_DIR="${DEMO_DIR:-$(mktemp -d /tmp/kmsfs-demo.XXXXXX)}"
mkdir -p -m 700 "$DEMO_DIR"  # one named in DEMO_DIR may not exist yet
export KMSFS_STORE="$DEMO_DIR/store"
export KMSFS_STATE_DIR="$DEMO_DIR/state"
LOG="$DEMO_DIR/mount.log"  # not syslog, nor /var/log/kmsfs.log where there is no syslog
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. init: a store, two embedded HSMs (SoftHSM2 tokens) and the genesis trust"
kmsfs-admin init --hsms 2
kmsfs-admin hsm list

step "2. three operators, each with a key in their own token, unlocked by their own PIN"
for name in alice bob carol; do
    ( umask 077; head -c 12 /dev/urandom | base64 > "$DEMO_DIR/$name.pin" )
    kmsfs-admin operator create "$name" --pin-file "$DEMO_DIR/$name.pin"
done

step "3. propose a trust: both HSMs, the three operators, quorum 2"
TRUST=$(kmsfs-admin trust propose --hsm hsm1 --hsm hsm2 \
    --operator alice --operator bob --operator carol --quorum 2 | tail -n 1)
kmsfs-admin trust show "$TRUST"

step "4. one signature is not enough: sealing is refused"
kmsfs-admin trust sign "$TRUST" --as alice --pin-file "$DEMO_DIR/alice.pin"
if kmsfs-admin trust seal "$TRUST"; then echo "demo: sealed with 1 of 2?!" >&2; exit 1; fi

step "5. a second operator signs; an HSM of the trust seals it; anyone can verify"
kmsfs-admin trust sign "$TRUST" --as bob --pin-file "$DEMO_DIR/bob.pin"
kmsfs-admin trust seal "$TRUST"
kmsfs-admin trust verify "$TRUST"

step "6. a domain: k and mk generated inside an HSM, k wrapped to both HSMs"
kmsfs-admin domain create payroll --trust "$TRUST"
kmsfs-admin domain verify payroll
kmsfs-admin domain list

step "7. bind a ciphertext directory to the domain and mount it"
CIPHER="$DEMO_DIR/cipher"
MNT="$DEMO_DIR/mnt"
mkdir -p "$MNT"
kmsfs init "$CIPHER" --domain payroll
kmsfs mount "$CIPHER" "$MNT" --log-file "$LOG"
trap 'mountpoint -q "$MNT" && kmsfs umount "$MNT"' EXIT

step "8. ordinary tools on the plaintext view"
mkdir -p "$MNT/2026/q4"
printf 'employee,salary\nada,100\ngrace,120\n' > "$MNT/2026/q4/salaries.csv"
cp /etc/os-release "$MNT/2026/"
ln -s q4/salaries.csv "$MNT/2026/latest.csv"
ls -lR "$MNT"
cat "$MNT/2026/latest.csv"

step "9. what is on disk: encrypted names and contents"
find "$CIPHER" | sed "s|$DEMO_DIR/||" | head -20
if grep -rq "grace" "$CIPHER"; then echo "demo: plaintext on disk?!" >&2; exit 1; fi
echo "(no plaintext name or content under $CIPHER)"
kmsfs info "$CIPHER"

step "10. unmount, mount again, read back"
kmsfs umount "$MNT"
kmsfs mount "$CIPHER" "$MNT" --log-file "$LOG"
cat "$MNT/2026/q4/salaries.csv"
kmsfs umount "$MNT"
trap - EXIT
echo
echo "demo: done; everything is under $DEMO_DIR"
