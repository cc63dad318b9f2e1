#!/usr/bin/env bash
# make vm-test: the checks of scripts/vm/guest/ in a real Debian 12 VM (kernel
# 6.1, systemd as PID 1).  Builds the image once (build-image.sh, cached),
# puts the wheel built from this working tree, the tests and the units on a
# payload disk, boots, waits for the guest to power off (never longer than
# VM_TIME_LIMIT seconds), and copies the results back to build/vm-test/.
# KVM when it works; when /dev/kvm is missing or the guest does not reach
# systemd within VM_KVM_PROBE seconds (nested KVM can hang in early boot),
# it falls back to software emulation (TCG) by itself.
# Exit code: the guest's (0 = every check passed); 1 when the VM never finished.
set -euo pipefail
# Everything in a function, parsed before it runs: editing this file during a run is safe.
main() {
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/scripts/vm
limit=${VM_TIME_LIMIT:-2700}
probe=${VM_KVM_PROBE:-60}
results=${VM_RESULTS:-$repo/build/vm-test}
cache=${VM_CACHE:-/var/cache/reuseport-standby/vm}
python=${PYTHON:-python3}
log() { echo "vm-test: $*" >&2; }
t_start=$(date +%s)

for tool in qemu-system-x86_64 debootstrap mkfs.ext4 debugfs; do
  command -v "$tool" >/dev/null || { log "$tool is missing: run 'make host' (scripts/setup-host.sh installs it)"; exit 1; }
done

img=$(bash "$here/build-image.sh")
[ -f "$img/base.img" ] || { log "the image build did not give a directory with base.img: $img"; exit 1; }
t_image=$(date +%s)

work=$(mktemp -d /var/tmp/rs-vm.XXXXXX)
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# -- payload: the wheel of this tree, its dependencies, tests, units, checks --
payload=$work/payload
mkdir -p "$payload/out" "$payload/wheels"
"$python" -m pip wheel -q --no-deps -w "$payload/wheels" "$repo" >/dev/null
reqs="pytest gunicorn flask prometheus_client"
wheelhouse=$cache/wheels-$(echo "$reqs" | sha256sum | cut -c1-12)
if [ ! -d "$wheelhouse" ]; then
  "$python" -m pip download -q --only-binary=:all: -d "$wheelhouse.tmp" $reqs
  mv "$wheelhouse.tmp" "$wheelhouse"
fi
cp "$wheelhouse"/*.whl "$payload/wheels/"
mkdir -p "$payload/tests" "$payload/examples"
# The kernel tests, and the control-plane security tests whose point is the kernel's behaviour
# (SO_LOCK_FILTER, detach and re-attach, flock on bpffs, a 0700 bpffs mount) on Debian 12's kernel.
cp "$repo/tests/conftest.py" "$repo/tests/test_kernel.py" "$repo/tests/test_program_integrity.py" \
   "$repo/tests/test_trusted_paths.py" "$payload/tests/"
mkdir -p "$payload/tests/helpers" "$payload/tests/apps"
cp "$repo"/tests/helpers/*.py "$payload/tests/helpers/"
cp "$repo"/tests/apps/*.py "$payload/tests/apps/"
cp -r "$repo/examples/systemd" "$payload/examples/"
cp -r "$here/guest" "$payload/guest"
# VM_STEPS: only these steps of guest/run.sh (e.g. "venv systemd"); VM_GUEST_SCRIPT:
# another script instead of the checks (for experiments).
[ -n "${VM_STEPS:-}" ] && echo "$VM_STEPS" >"$payload/steps"
# VM_PYTEST_ARGS: other arguments for the kernel-tests step (e.g. one test file).
[ -n "${VM_PYTEST_ARGS:-}" ] && echo "$VM_PYTEST_ARGS" >"$payload/pytest-args"
cp "${VM_GUEST_SCRIPT:-$here/guest/run.sh}" "$payload/run.sh"
echo $(( limit - 120 )) >"$payload/timeout"
chmod -R a+rX "$payload"   # tests drop to nobody; mktemp made the top 0700   # the guest stops its own checks first
mkfs.ext4 -q -L rs-payload -d "$payload" "$work/payload.img" 1G >&2

# -- boot ----------------------------------------------------------------------
boot() {  # boot ACCEL: start qemu in the background
  : >"$work/console.log"
  local accel=$1 extra=()
  [ "$accel" = tcg ] && extra=(-accel tcg,thread=multi) || extra=(-accel kvm -cpu host)
  qemu-system-x86_64 "${extra[@]}" -m 3072 -smp 2 -no-reboot -display none -monitor none \
    -serial "file:$work/console.log" -nic none \
    -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1" \
    -drive "file=$img/base.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$work/payload.img,if=virtio,format=raw" &
  qemu_pid=$!
}
reached_systemd() { grep -q "systemd\[1\]\|Welcome to" "$work/console.log" 2>/dev/null; }

accel=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ "${VM_ACCEL:-}" != tcg ]; then
  boot kvm
  for _ in $(seq "$probe"); do
    reached_systemd && { accel=kvm; break; }
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 1
  done
  if [ $accel != kvm ]; then
    if kill -0 "$qemu_pid" 2>/dev/null; then
      log "KVM did not reach systemd within ${probe}s (last console line: $(tr -d '\r' <"$work/console.log" | tail -n 1)); falling back to TCG"
    else
      log "qemu with KVM exited before systemd started; falling back to TCG"
    fi
    kill -9 "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
    cp "$work/console.log" "$work/console-kvm.log"
  fi
else
  log "no usable /dev/kvm; using TCG"
fi
[ $accel = tcg ] && boot tcg
log "booted with $accel; waiting for the checks (at most ${limit}s)"

deadline=$(( $(date +%s) + limit ))
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "time limit of ${limit}s reached: powering the VM off"
    kill -9 "$qemu_pid"; break
  fi
  sleep 2
done
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
t_end=$(date +%s)

# -- results ---------------------------------------------------------------------
rm -rf "$results"; mkdir -p "$results"
debugfs -R "rdump /out $results" "$work/payload.img" >/dev/null 2>&1 || true
cp "$work/console.log" "$results/console.log"
[ -f "$work/console-kvm.log" ] && cp "$work/console-kvm.log" "$results/"
rc=$(cat "$results/out/exit-code" 2>/dev/null || echo 1)
{
  echo "accelerator: $accel"
  echo "image: $(( t_image - t_start )) s (cached: $img), VM run: $(( t_end - t_image )) s"
  [ -f "$results/out/facts.log" ] && sed 's/^/  /' "$results/out/facts.log"
  echo "steps (name, exit code, seconds):"
  [ -f "$results/out/summary.tsv" ] && sed 's/^/  /' "$results/out/summary.tsv" || echo "  none: the guest did not report (see $results/console.log)"
  [ -f "$results/out/kernel-tests.log" ] && tail -n 3 "$results/out/kernel-tests.log" | sed 's/^/  kernel tests: /'
  [ -f "$results/out/systemd.log" ] && grep -E "^\[.*\] (PASS|FAIL) " "$results/out/systemd.log" | sed 's/^\[[^]]*\] /  /'
} | tee "$results/summary.txt"
log "guest exit code $rc; results in $results"
exit "$rc"
}
main "$@"
