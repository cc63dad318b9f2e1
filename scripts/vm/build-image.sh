#!/usr/bin/env bash
# Builds (once) the Debian 12 VM image that `make vm-test` boots: debootstrap of
# scripts/vm/packages.txt, with Debian's cloud kernel (6.1) and systemd as PID 1.
# Cached under $VM_CACHE/<key>/, the key being a hash of the package list and of
# this script, so a changed list rebuilds and an unchanged one costs nothing.
# Prints the cache directory (base.img, vmlinuz, initrd.img) on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VM_CACHE:-/var/cache/reuseport-standby/vm}
key=$(cat "$here/packages.txt" "$here/build-image.sh" | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/base.img" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "$out"; exit 0
fi
log() { echo "vm-image: $*" >&2; }

# The mirror this host's apt already uses (deb822 or one-line format).
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { log "no Debian mirror found in this host's apt configuration"; exit 1; }
security=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian-security\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)

rm -rf "$out.tmp"; mkdir -p "$out.tmp"
root=$out.tmp/root
include=$(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$' | paste -sd, -)
log "debootstrap bookworm from $mirror (once; about 2-4 minutes)"
start=$(date +%s)
debootstrap --variant=minbase --include="$include" bookworm "$root" "$mirror" >"$out.tmp/debootstrap.log" 2>&1 || {
  tail -n 30 "$out.tmp/debootstrap.log" >&2; log "debootstrap failed (log: $out.tmp/debootstrap.log)"; exit 1; }
if [ -n "$security" ]; then
  # Point the guest's apt at the same mirrors (it never reaches them: the VM has no network).
  printf 'deb %s bookworm main\ndeb %s bookworm-security main\n' "$mirror" "$security" >"$root/etc/apt/sources.list"
fi

# Boot straight to systemd on the serial console, root on /dev/vda, no password
# prompts: the VM is a throwaway test host with no network.
echo "rs-vm" >"$root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null
ln -sf /dev/null "$root/etc/systemd/system/systemd-timesyncd.service"
ln -sf /dev/null "$root/etc/systemd/system/apt-daily.timer"
ln -sf /dev/null "$root/etc/systemd/system/apt-daily-upgrade.timer"
ln -sf /dev/null "$root/etc/systemd/system/e2scrub_reap.service"
# The one baked-in hook: run whatever the payload disk (/dev/vdb) brings, then power off.
install -m 0644 "$here/rs-vm-payload.service" "$root/etc/systemd/system/rs-vm-payload.service"
ln -sf /etc/systemd/system/rs-vm-payload.service "$root/etc/systemd/system/multi-user.target.wants/rs-vm-payload.service"
mkdir -p "$root/mnt/payload"

cp -L "$root/vmlinuz" "$out.tmp/vmlinuz"
cp -L "$root/initrd.img" "$out.tmp/initrd.img"
rm -rf "$root/var/cache/apt/archives/"*.deb
size_mb=$(( $(du -sm "$root" | cut -f1) + 1024 ))
mkfs.ext4 -q -L rs-vm-root -d "$root" "$out.tmp/base.img" "${size_mb}M" >&2  # stdout carries only the result
rm -rf "$root"
rm -rf "$out"; mv "$out.tmp" "$out"
log "image built in $(( $(date +%s) - start )) s: $out"
echo "$out"
