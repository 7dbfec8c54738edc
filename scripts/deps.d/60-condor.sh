#!/usr/bin/env bash
# condor tier set-up: a Debian 13 (trixie) root holding HTCondor 23.9 (`condor` + `minicondor`), qemu,
# libvirt and Python, made once with mmdebstrap and cached on the machine. The test fixture
# (tests/fixtures/condor.py) mounts a fresh overlay of it per test session, installs vmtool there from
# a wheel and runs a one-machine pool in it (chroot + its own mount, pid and network namespaces).
#
# Let mmdebstrap install everything: it makes its own /dev. Never apt-get inside such a root while the
# host's /dev is bind-mounted (postinst scripts chgrp the host's /dev/kvm; environment.md).
# Idempotent: the directory name carries a hash of the package list; a ready cache costs a stat.
set -euo pipefail

PACKAGES=(
    condor minicondor condor-vm-gahp
    qemu-system-x86 qemu-utils
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-log libvirt-clients
    python3 python3-venv python3-pip python3-libvirt python3-lxml
    ca-certificates procps iproute2
)
CACHE="${VMTOOL_CI_CACHE:-/var/cache/vmtool-ci}"
hash=$(printf '%s\n' trixie "${PACKAGES[@]}" | sha256sum | cut -c1-12)
ROOT="$CACHE/trixie-condor-$hash"

if [ -f "$ROOT/.vmtool-complete" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "deps.d/60-condor: the condor tier needs a trixie root at $ROOT, made as root" >&2
    echo "hint: run 'make deps' as root" >&2
    exit 0
fi
if ! command -v mmdebstrap >/dev/null; then
    echo "deps.d/60-condor: installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.trixie-condor.lock"
flock 9
[ -f "$ROOT/.vmtool-complete" ] && exit 0
echo "deps.d/60-condor: making the trixie HTCondor root $ROOT (a few minutes, once)"
start=$(date +%s)
rm -rf "$ROOT" "$ROOT.tmp"
# No systemd in the root: policy-rc.d keeps maintainer scripts from starting services.
mmdebstrap --quiet --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --customize-hook='printf "#!/bin/sh\nexit 101\n" > "$1/usr/sbin/policy-rc.d"; chmod +x "$1/usr/sbin/policy-rc.d"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    trixie "$ROOT.tmp"
echo "$(( $(date +%s) - start ))" > "$ROOT.tmp/.vmtool-build-seconds"
touch "$ROOT.tmp/.vmtool-complete"
mv "$ROOT.tmp" "$ROOT"
# Older roots (another package list) are no longer used, unless a running test still mounts one.
for old in "$CACHE"/trixie-condor-*; do
    [ "$old" = "$ROOT" ] || [ ! -d "$old" ] || grep -qF "lowerdir=$old" /proc/self/mounts || rm -rf "$old"
done
echo "deps.d/60-condor: root ready in $(cat "$ROOT/.vmtool-build-seconds") s"
