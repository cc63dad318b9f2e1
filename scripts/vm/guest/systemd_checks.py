"""The documented systemd deployment, carried out for real in the test VM.

Runs inside the VM (systemd as PID 1, Debian's kernel) as root, with the
project installed in the checks' own venv.  Follows docs/deployment.md
step by step (offline: pip installs from the wheelhouse on the payload
disk), then proves, from the running system:

- the sandboxing each unit asks for is applied (capabilities,
  NoNewPrivileges, seccomp, read-only and writable mounts) and the
  supervisor works under it;
- ``Type=notify`` and ``ExecStartPost=`` gate "started" on "serving";
- under load, after each of ``systemctl restart myapp@standby``,
  ``restart myapp@primary``, ``kill -s KILL myapp@primary`` and
  ``restart reuseport-standby@myapp``, no request sent after the action
  fails;
- the ``run``-mode unit, with a rolling reload by ``systemctl reload``.

Every result is a line in OUT/systemd.json and a PASS/FAIL line on stdout;
the exit code is the number of failed checks (capped at 100).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reuseport_standby.loadgen import Load, one_request

CAP_NET_BIND_SERVICE, CAP_PERFMON, CAP_BPF = 10, 38, 39
SUPERVISOR_CAPS = {CAP_BPF, CAP_NET_BIND_SERVICE}
PORT, RUN_PORT = 80, 8080

results: list[dict] = []


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.1f}] {msg}", flush=True)


def check(name: str, ok: bool, **detail: object) -> bool:
    results.append({"check": name, "ok": bool(ok), **detail})
    log(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(detail, default=str)}")
    return ok


def sh(*cmd: str, check_rc: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if cp.stdout.strip():
        print(cp.stdout.rstrip(), flush=True)
    if cp.stderr.strip():
        print(cp.stderr.rstrip(), flush=True)
    if check_rc and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {cp.returncode}")
    return cp


def show(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(unit: str) -> int:
    return int(show(unit, "MainPID")["MainPID"])


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def caps(mask_hex: str) -> set[int]:
    m = int(mask_hex, 16)
    return {i for i in range(64) if m >> i & 1}


def mounts(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as the process sees them."""
    table: dict[str, set[str]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        f = line.split()
        table[f[4]] = set(f[5].split(","))
    return table


def covering(table: dict[str, set[str]], path: str) -> set[str]:
    """Options of the mount that holds ``path`` (the longest mount point above it)."""
    best = max((p for p in table if path == p or path.startswith(p.rstrip("/") + "/")), key=len)
    return table[best]


def children(pid: int) -> list[int]:
    out = sh("pgrep", "-P", str(pid), check_rc=False).stdout.split()
    return [int(p) for p in out]


# -- the deployment, as docs/deployment.md says ------------------------------

APP = '''\
import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return f"{os.environ.get('REUSEPORT_STANDBY_ROLE', 'run')} {os.getpid()}\\n"
'''


def deploy(payload: Path) -> None:
    wheels = str(payload / "wheels")
    # Step 1: packages (in the image already: the VM has no network), the user.
    sh("useradd", "--system", "--user-group", "--home-dir", "/srv/myapp", "--shell", "/usr/sbin/nologin", "myapp")
    # Step 2: two root-owned venvs, app code in /srv/myapp.
    Path("/srv/myapp").mkdir(parents=True, exist_ok=True)
    Path("/srv/myapp/app.py").write_text(APP)
    Path("/srv/myapp/requirements.txt").write_text("flask\n")
    sh("python3", "-m", "venv", "/opt/reuseport-standby")
    sh("/opt/reuseport-standby/bin/pip", "install", "-q", "--no-index", "--find-links", wheels, "reuseport-standby")
    sh("python3", "-m", "venv", "/opt/myapp/venv")
    sh("/opt/myapp/venv/bin/pip", "install", "-q", "--no-index", "--find-links", wheels,
       "reuseport-standby[gunicorn]", "-r", "/srv/myapp/requirements.txt")
    # Step 3: units and addresses, exactly as shipped.
    systemd = payload / "examples" / "systemd"
    for unit in ("reuseport-standby@.service", "myapp@.service", "myapp-run.service"):
        shutil.copy(systemd / unit, f"/etc/systemd/system/{unit}")
    Path("/etc/reuseport-standby").mkdir(exist_ok=True)
    shutil.copy(systemd / "myapp.env", "/etc/reuseport-standby/myapp.env")
    sh("systemctl", "daemon-reload")


def started_means_serving() -> None:
    """Step 4, with the gates checked the moment each `systemctl` returns."""
    t0 = time.monotonic()
    sh("systemctl", "enable", "--now", "reuseport-standby@myapp", timeout=120)
    took = time.monotonic() - t0
    # Type=notify: `systemctl start` returned, so READY=1 came; the control socket must answer now.
    st = sh("/opt/reuseport-standby/bin/reuseport-standby", "status", "--service", "myapp", check_rc=False)
    props = show("reuseport-standby@myapp", "Type", "NotifyAccess", "ActiveState", "SubState",
                 "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "NRestarts")
    check("supervisor Type=notify: active only once its control socket answers",
          st.returncode == 0 and props["Type"] == "notify" and props["ActiveState"] == "active"
          and int(props["ActiveEnterTimestampMonotonic"]) > int(props["ExecMainStartTimestampMonotonic"])
          and props["NRestarts"] == "0",
          start_seconds=round(took, 2), status_rc=st.returncode,
          ready_after_exec_ms=(int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) // 1000,
          **{k: props[k] for k in ("Type", "NotifyAccess", "ActiveState", "NRestarts")})
    for role in ("standby", "primary"):
        unit = f"myapp@{role}"
        t0 = time.monotonic()
        sh("systemctl", "enable", "--now", unit, timeout=200)
        took = time.monotonic() - t0
        pid = main_pid(unit)
        ck = sh("/opt/myapp/venv/bin/reuseport-standby", "check", "--service", "myapp", "--pid", str(pid), check_rc=False)
        props = show(unit, "ActiveState", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "ExecStartPost")
        gate_ms = (int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])) // 1000
        check(f"{unit} ExecStartPost=: active only once the instance serves",
              ck.returncode == 0 and props["ActiveState"] == "active" and "reuseport-standby" in props["ExecStartPost"]
              and re.search(r"code=exited ; status=0(/0)? }", props["ExecStartPost"]) is not None,
              start_seconds=round(took, 2), check_rc=ck.returncode, active_after_exec_ms=gate_ms,
              exec_start_post=props["ExecStartPost"])
    sh("/opt/reuseport-standby/bin/reuseport-standby", "status", "--service", "myapp", check_rc=False)


def sandboxing() -> None:
    """What each unit asked for, read back from the running processes."""
    sup = main_pid("reuseport-standby@myapp")
    s = proc_status(sup)
    m = mounts(sup)
    check("supervisor: uid 0 with exactly CAP_BPF + CAP_NET_BIND_SERVICE (bounding, effective, ambient)",
          s["Uid"].split()[0] == "0" and caps(s["CapBnd"]) == SUPERVISOR_CAPS
          and caps(s["CapEff"]) == SUPERVISOR_CAPS and caps(s["CapAmb"]) == SUPERVISOR_CAPS,
          pid=sup, CapBnd=s["CapBnd"], CapEff=s["CapEff"], CapAmb=s["CapAmb"])
    check("supervisor: NoNewPrivileges and a seccomp filter (RestrictAddressFamilies, SystemCallArchitectures)",
          s["NoNewPrivs"] == "1" and s["Seccomp"] == "2", NoNewPrivs=s["NoNewPrivs"], Seccomp=s["Seccomp"])
    fam = show("reuseport-standby@myapp", "RestrictAddressFamilies")["RestrictAddressFamilies"]
    check("supervisor: address families restricted to unix, inet, inet6, netlink",
          set(fam.split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}, RestrictAddressFamilies=fam)
    ro = {p: "ro" in covering(m, p) for p in ("/", "/usr", "/etc", "/root", "/sys", "/proc/sys")}
    check("supervisor: file system read-only (ProtectSystem=strict, ProtectKernelTunables=yes)",
          all(ro.values()), read_only=ro)
    mine = "/sys/fs/bpf/reuseport_standby/myapp"
    check("supervisor: its own bpffs directory writable, the rest of bpffs read-only, its pins there",
          "rw" in m.get(mine, set()) and "ro" in m.get("/sys/fs/bpf", set()) and any(Path(mine).iterdir()),
          service_dir=sorted(m.get(mine, [])), bpffs=sorted(m.get("/sys/fs/bpf", [])),
          pins=sorted(p.name for p in Path(mine).iterdir()))
    theirs, ours = os.stat(f"/proc/{sup}/root/tmp"), os.stat("/tmp")
    check("supervisor: a private /tmp (PrivateTmp=yes)", (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino))
    for role in ("primary", "standby"):
        unit = f"myapp@{role}"
        master = main_pid(unit)
        procs = [master, *children(master)]
        bad = []
        for pid in procs:
            st = proc_status(pid)
            if st["Uid"].split()[0] == "0" or caps(st["CapEff"]) or caps(st["CapBnd"]) or st["NoNewPrivs"] != "1" or st["Seccomp"] != "2":
                bad.append({"pid": pid, "Uid": st["Uid"], "CapEff": st["CapEff"], "CapBnd": st["CapBnd"]})
        am = mounts(master)
        check(f"{unit}: every process ({len(procs)}) unprivileged, no capabilities, NoNewPrivileges, seccomp; / read-only",
              not bad and "ro" in am.get("/", set()) and "ro" in am.get("/sys", set()), offenders=bad,
              uid=proc_status(master)["Uid"].split()[0])


# -- under load --------------------------------------------------------------

def wait_active(unit: str, timeout: float = 180) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if show(unit, "ActiveState")["ActiveState"] == "active":
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"{unit} not active after {timeout} s")


def wait_serving(unit: str, service: str = "myapp", timeout: float = 180) -> None:
    wait_active(unit, timeout)
    sh("/opt/myapp/venv/bin/reuseport-standby", "check", "--service", service, "--pid", str(main_pid(unit)),
       "--wait", str(timeout))


def failures_in(result, start: float, end: float) -> list[tuple[float, float, str]]:
    return [f for f in result.failure_events if start <= f[0] < end]


def kill_primary() -> float:
    """SIGKILL to every process of the primary unit; returns when the last of them is gone.

    Requests those processes had already accepted die with them (the physical limit: no port
    sharing can save them), so the line for "sent after the action" is drawn here."""
    master = main_pid("myapp@primary")
    doomed = [master, *children(master)]
    sh("systemctl", "kill", "-s", "KILL", "myapp@primary")
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and "State:\tZ" not in _state(p) for p in doomed):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {doomed} still alive 30 s after SIGKILL")
        time.sleep(0.01)
    gone = time.monotonic()
    time.sleep(2)
    wait_serving("myapp@primary")
    return gone


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"


def restarts_under_load() -> None:
    actions = [
        ("systemctl restart myapp@standby", lambda: sh("systemctl", "restart", "myapp@standby", timeout=200)),
        ("systemctl restart myapp@primary", lambda: sh("systemctl", "restart", "myapp@primary", timeout=200)),
        ("systemctl kill -s KILL myapp@primary", kill_primary),
        ("systemctl restart reuseport-standby@myapp", lambda: sh("systemctl", "restart", "reuseport-standby@myapp", timeout=120)),
        # After the supervisor restart the instances re-announced themselves: a restart must still hand over.
        ("systemctl restart myapp@primary (after the supervisor restart)",
         lambda: sh("systemctl", "restart", "myapp@primary", timeout=200)),
    ]
    load = Load("127.0.0.1", PORT, concurrency=4, duration=900, max_requests=10_000_000).start()
    # (name, action started, line after which nothing may fail, action returned)
    marks: list[tuple[str, float, float, float]] = []
    try:
        time.sleep(3)
        for name, act in actions:
            t0 = time.monotonic()
            line = act()  # a SIGKILL draws the line when its processes are gone
            marks.append((name, t0, line if isinstance(line, float) else t0, time.monotonic()))
            time.sleep(4)  # requests keep flowing while the restarted instance settles
    finally:
        result = load.stop()
    end = time.monotonic()
    log(f"load: {result.summary()}")
    for i, (name, t0, line, t1) in enumerate(marks):
        nxt = marks[i + 1][1] if i + 1 < len(marks) else end  # until the next action starts
        after = failures_in(result, line, nxt)
        in_flight = failures_in(result, t0, line)  # sent before SIGKILLed processes were gone: they held them
        check(f"under load, {name}: 0 failed requests of those sent after it",
              not after, failed_after=len(after), in_flight_when_killed=len(in_flight),
              action_seconds=round(t1 - t0, 2), kinds=sorted({k for _, _, k in after}),
              in_flight_kinds=sorted({k for _, _, k in in_flight}))
    before = failures_in(result, 0.0, marks[0][1]) if marks else []
    check("under load: requests served through all of it, none failed before the first action",
          result.ok > 0 and not before, failed_before=len(before),
          requests=result.total, served=result.ok, failed=result.failed, failures=dict(result.failures),
          max_latency_ms=round(result.max_latency * 1000), p99_ms=round(result.percentile(0.99) * 1000))
    six, _ = one_request("::1", PORT)
    check("IPv6: [::1]:80 answers too", six == "ok", outcome=six)


def run_mode() -> None:
    """examples/systemd/myapp-run.service: `reuseport-standby run` as one unit, reloaded by systemctl."""
    for unit in ("myapp@primary", "myapp@standby"):
        sh("systemctl", "stop", unit, timeout=120)
    t0 = time.monotonic()
    sh("systemctl", "start", "myapp-run", timeout=180)
    # Type=notify: `systemctl start` returns once `run` said READY=1, i.e. both instances serve.
    first = one_request("127.0.0.1", RUN_PORT)[0]
    before = sh("/opt/myapp/venv/bin/reuseport-standby", "status", "--service", "myapp-run", "--json").stdout
    states = sorted(i["state"] for i in json.loads(before).get("instances", []) if i.get("role"))
    check("run-mode unit (Type=notify): serving with both instances active when `systemctl start` returns",
          first == "ok" and states == ["active", "active"], outcome=first, states=states,
          start_seconds=round(time.monotonic() - t0, 1))
    myapp = int(sh("id", "-u", "myapp").stdout)
    masters = [i["pid"] for i in json.loads(before).get("instances", []) if i.get("role")]
    who = {pid: (proc_status(pid)["Uid"].split()[0], proc_status(pid)["CapEff"], proc_status(pid)["Groups"])
           for pid in masters + [c for m in masters for c in children(m)]}
    check("run-mode unit: `run --user myapp` starts the instances and their workers as myapp, no capability",
          bool(who) and all(uid == str(myapp) and int(eff, 16) == 0 for uid, eff, _ in who.values()), processes=who)
    load = Load("127.0.0.1", RUN_PORT, concurrency=4, duration=600, max_requests=10_000_000).start()
    try:
        time.sleep(3)
        t0 = time.monotonic()
        rl = sh("systemctl", "reload", "myapp-run", check_rc=False, timeout=400)
        took = time.monotonic() - t0
        time.sleep(3)
    finally:
        result = load.stop()
    after = sh("/opt/myapp/venv/bin/reuseport-standby", "status", "--service", "myapp-run", "--json").stdout
    pids = lambda raw: sorted(i["pid"] for i in json.loads(raw).get("instances", []))  # noqa: E731
    check("run-mode unit: `systemctl reload` is a rolling reload with 0 failed requests",
          rl.returncode == 0 and result.failed == 0 and result.ok > 0 and pids(before) != pids(after)
          and show("myapp-run", "ActiveState")["ActiveState"] == "active",
          reload_rc=rl.returncode, reload_seconds=round(took, 1), requests=result.total, failed=result.failed,
          failures=dict(result.failures), instances_before=pids(before), instances_after=pids(after))
    sh("systemctl", "stop", "myapp-run", timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payload", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    # (name, what it does, the stage it needs)
    stages = [("deploy", lambda: deploy(args.payload), None), ("start", started_means_serving, "deploy"),
              ("sandbox", sandboxing, "start"), ("load", restarts_under_load, "start"),
              ("run-mode", run_mode, "deploy")]
    passed: set[str] = set()
    for name, fn, needs in stages:
        if needs is not None and needs not in passed:
            check(f"stage {name} completed", False, error=f"skipped: stage {needs} failed")
            continue
        t0 = time.monotonic()
        try:
            fn()
            passed.add(name)
        except Exception as exc:  # a stage that breaks is a failed check; the stages that do not need it still run
            check(f"stage {name} completed", False, error=f"{type(exc).__name__}: {exc}")
        results.append({"stage": name, "seconds": round(time.monotonic() - t0, 1), "ok": name in passed})
        log(f"stage {name}: {round(time.monotonic() - t0, 1)} s")
    for unit in ("reuseport-standby@myapp", "myapp@primary", "myapp@standby", "myapp-run"):
        sh("journalctl", "-u", unit, "--no-pager", "-o", "short-monotonic", check_rc=False)
    (args.out / "systemd.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [r for r in results if "check" in r and not r["ok"]]
    log(f"{len(results) - len(failed)} checks passed, {len(failed)} failed")
    return min(len(failed), 100)


if __name__ == "__main__":
    sys.exit(main())
