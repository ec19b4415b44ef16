#!/usr/bin/env bash
# Build (once) a Debian bookworm arm64 userland with Python 3.11 at $1, the same userland as
# Raspberry Pi OS 64-bit. Needs root, debootstrap and qemu-user-static (apt-get install -y
# debootstrap qemu-user-static binfmt-support). Idempotent: a finished root has .splitlm-ready.
set -euo pipefail
ROOT=${1:?usage: bootstrap.sh ROOT}
[ -e "$ROOT/.splitlm-ready" ] && exit 0
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64
fi
rm -rf "$ROOT"
mkdir -p "$(dirname "$ROOT")"
debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv \
  bookworm "$ROOT" http://deb.debian.org/debian
touch "$ROOT/.splitlm-ready"
