#!/usr/bin/env bash
# Prepares a Debian/Ubuntu host (as root) for reuseport-standby's demo and tests:
# the system libbpf, clang + libbpf headers (to rebuild and check the BPF object),
# bpftool and iproute2 (nstat/ss, used by tests and benchmarks), and a mounted bpffs.
# Idempotent: installs only what is missing.
set -euo pipefail

packages=(libbpf1 libbpf-dev clang llvm bpftool iproute2 python3-venv make)

if [ "$(id -u)" != 0 ]; then
  echo "setup-host: run as root (needs apt-get and mount)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! mount | grep -q " /sys/fs/bpf type bpf"; then
  echo "setup-host: mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
