#!/usr/bin/env bash
# Installs what vmtool needs on a Debian 12 machine, only what is missing, then builds .venv.
# Idempotent: a second run on a ready machine installs nothing and takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
    qemu-system-x86 qemu-utils
    libvirt-daemon-system libvirt-clients python3-libvirt
    libguestfs-tools python3-guestfs
    linux-image-amd64 busybox-static
    beanstalkd squid
    nftables dnsmasq-base slirp4netns
    e2fsprogs xfsprogs fdisk gdisk lvm2 dosfstools mtools
    ovmf systemd-boot-efi binutils
    openssh-server openssh-client openssl tar gzip curl
    mmdebstrap zstd lz4 cpio
    python3-venv python3-dev
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing Debian packages: ${missing[*]}" >&2
        echo "hint: run 'make deps' as root, or install them with apt-get" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No systemd on these machines: keep maintainer scripts from trying to start services.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The guestfs and libvirt bindings exist only as Debian packages for /usr/bin/python3.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import guestfs, libvirt' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# Each area of vmtool may need more (a Glance venv for the cloud tests, sshd keys, ...): scripts/deps.d/.
for extra in scripts/deps.d/*.sh; do
    [ -e "$extra" ] && bash "$extra"
done
