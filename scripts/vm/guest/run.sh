#!/bin/bash
# Runs inside the test VM (Debian 12, kernel 6.1, systemd as PID 1) from the
# payload disk that scripts/vm/run-vm.sh attached; results go to out/ on that
# disk.  Each step is timed and its exit code recorded in out/summary.tsv.
set -u
P=/mnt/payload
OUT=$P/out
mkdir -p "$OUT"
: >"$OUT/summary.tsv"
failed=0

# VM_STEPS (from the host, in ./steps): only these steps, for a quicker try.
only=$(cat "$P/steps" 2>/dev/null || true)

step() {  # step NAME CMD...: run, time, record
  local name=$1; shift
  if [ -n "$only" ] && ! grep -qw -- "$name" <<<"$only"; then echo "=== $name: not asked for"; return 0; fi
  local t0=$(date +%s.%N)
  echo "=== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$OUT/summary.tsv"
  echo "=== $name: exit $rc in ${dt}s"
  tail -n 5 "$OUT/$name.log"
  [ "$rc" = 0 ] || failed=1
  return "$rc"
}

facts() {
  echo "kernel: $(uname -r)"
  echo "pid 1: $(cat /proc/1/comm)"
  systemctl --version | head -n 1
  echo "btf: $(test -e /sys/kernel/btf/vmlinux && echo yes || echo no)"
  findmnt -n /sys/fs/bpf || echo "bpffs: not mounted"
  python3 --version
  echo "libbpf: $(dpkg-query -W -f='${Version}' libbpf1)"
  echo "cpus: $(nproc)"
}
step facts facts

# A venv for the checks themselves: the project's wheel (from the host's
# working tree) and pytest, offline from the wheelhouse the host brought.
setup_test_venv() {
  python3 -m venv /opt/rs-checks &&
  /opt/rs-checks/bin/pip install -q --no-index --find-links "$P/wheels" "reuseport-standby[metrics]" pytest
}
step venv setup_test_venv || { echo 1 >"$OUT/failed"; exit 1; }

# The kernel tests against the installed package (libbpf and BCC loaders).
kernel_tests() {
  cd "$P/tests" && REUSEPORT_STANDBY_REQUIRE_KERNEL=1 PYTHONDONTWRITEBYTECODE=1 \
    /opt/rs-checks/bin/python -m pytest -p no:cacheprovider -q -ra \
      $(cat "$P/pytest-args" 2>/dev/null || echo test_kernel.py test_program_integrity.py test_trusted_paths.py)
}
step kernel-tests kernel_tests

# The program loads with the least privilege the docs state (CAP_BPF only,
# no CAP_PERFMON: so the verifier applies its Spectre v1 checks).
least_privilege() {
  local pins=/sys/fs/bpf/rs-least-privilege
  setpriv --inh-caps=-all,+bpf --ambient-caps=-all,+bpf --bounding-set=-all,+bpf \
    /opt/rs-checks/bin/python -c "
import time; from reuseport_standby.kernel.group import Group
t = time.monotonic(); g = Group.open('$pins'); info = g.prog_info
print(f'loaded with CAP_BPF only in {(time.monotonic() - t) * 1000:.0f} ms: prog id {info.id}, tag {g.prog_tag}, {info.xlated_prog_len // 8} insns')
g.close()"
  local rc=$?
  rm -rf "$pins"
  return $rc
}
step least-privilege least_privilege

# The documented systemd deployment and the run-mode unit, under load.
step systemd /opt/rs-checks/bin/python "$P/guest/systemd_checks.py" --payload "$P" --out "$OUT"

journalctl -b --no-pager -o short-monotonic >"$OUT/journal.txt" 2>&1
exit $failed
