#!/usr/bin/env bash
# Prepares a Debian 12 host (as root) for reuseport-standby's demo and tests:
# the system libbpf, clang + libbpf headers (to rebuild and check the BPF object),
# bpftool and iproute2 (nstat/ss, used by tests and benchmarks), BCC and kernel
# headers (for the optional BCC loader), and a mounted bpffs.
# With --vm, also what `make vm-test` needs to build and boot a Debian 12 VM
# (debootstrap, qemu, e2fsprogs for mkfs.ext4 -d and debugfs).
# Idempotent: installs only what is missing.
set -euo pipefail

arch=$(dpkg --print-architecture)
packages=(libbpf1 libbpf-dev clang llvm bpftool iproute2 python3-venv make python3-bpfcc)
[ "${1:-}" = --vm ] && packages+=(debootstrap qemu-system-x86 e2fsprogs)

if [ "$(id -u)" != 0 ]; then
  echo "setup-host: run as root (needs apt-get and mount)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
updated=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  [ $updated = 1 ] || { apt-get update -qq; updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

# BCC compiles against the running kernel's headers.  Where the distribution has no
# package for the running kernel, the generic headers package serves: the program
# only uses UAPI and socket types, stable across 6.x.
release=$(uname -r)
build=/lib/modules/$release/build
if [ ! -e "$build/include" ] && [ ! -e "$build/Makefile" ]; then
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1 || { apt-get update -qq; updated=1; apt-cache show "linux-headers-$release" >/dev/null 2>&1; }; then
    echo "setup-host: installing linux-headers-$release"
    apt_install "linux-headers-$release"
  else
    dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q "ok installed" || {
      echo "setup-host: no headers package for kernel $release; installing linux-headers-$arch"
      apt_install "linux-headers-$arch"
    }
    hdr=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
    mkdir -p "/lib/modules/$release"
    ln -sfn "$hdr" "$build"
    ln -sfn "$common" "/lib/modules/$release/source"
    echo "setup-host: linked $build -> $hdr"
  fi
fi

if ! mount | grep -q " /sys/fs/bpf type bpf"; then
  echo "setup-host: mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
