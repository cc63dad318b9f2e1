"""What an idle service costs: CPU per second of the supervisor, an idle primary and standby, side by side
with plain uvicorn idle in the same interval (issue 19, item 4).

Run as root: ``python bench/idle.py [--seconds 30] [--server uvicorn|gunicorn]``.  Starts
``reuseport-standby run`` with the bundled demo app on a free loopback port plus one plain ``uvicorn``
of the same app on another, waits for them to settle, then reads each process's utime+stime from
/proc over the same interval.  CPU time is counted in clock ticks (10 ms), so a run of 30 s resolves
about 0.3 ms/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reuseport_standby.kernel.pins import remove_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def describe(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = " ".join(a.decode() for a in args if a)
    if " supervise " in f" {text} ":
        return "supervisor"
    return "instance" if "reuseport_standby" in text else text[:60]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=6.0)
    ap.add_argument("--server", choices=("uvicorn", "gunicorn"), default="uvicorn")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    service = f"idle{uuid.uuid4().hex[:6]}"
    pin_root = f"/sys/fs/bpf/reuseport_standby_bench/{service}"
    control = f"/tmp/rs-{service}.sock"
    app = "reuseport_standby.demo_app:asgi_app" if args.server == "uvicorn" else "reuseport_standby.demo_app:app"
    cmd = ([str(BIN / "uvicorn"), app] if args.server == "uvicorn"
           else [str(BIN / "gunicorn"), "--workers", "1", app])
    run = subprocess.Popen([str(BIN / "reuseport-standby"), "run", "--service", service, "--bind",
                            f"127.0.0.1:{free_port()}", "--user", "root", "--control", control, "--pin-root", pin_root,
                            "--", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    plain = subprocess.Popen([str(BIN / "uvicorn"), "reuseport_standby.demo_app:asgi_app", "--port", str(free_port()),
                              "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        time.sleep(args.settle)
        procs = {pid: describe(pid) for pid in children(run.pid)}
        for pid in list(procs):  # gunicorn: its workers too
            for child in children(pid):
                procs[child] = procs[pid] + " worker"
        procs[run.pid] = "run"
        procs[plain.pid] = "plain uvicorn"
        before = {pid: cpu_seconds(pid) for pid in procs}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        rows = []
        for pid, what in procs.items():
            try:
                rows.append((what, pid, (cpu_seconds(pid) - before[pid]) / elapsed * 1000))
            except OSError:
                rows.append((what, pid, float("nan")))
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        os.killpg(plain.pid, signal.SIGTERM)
        run.wait(30)
        plain.wait(30)
        remove_tree(pin_root)  # a stopped service keeps its pins (for a restart): not a benchmark's
    print(f"idle CPU over {elapsed:.0f} s ({args.server}), ms of CPU per second:")
    for what, pid, ms in rows:
        print(f"  {what:<24} pid {pid:<8} {ms:6.2f}")
    ours = sum(ms for what, _, ms in rows if what in ("supervisor", "instance"))
    print(f"  supervisor + both instances: {ours:.2f}; plain uvicorn: "
          f"{next(ms for what, _, ms in rows if what == 'plain uvicorn'):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": elapsed, "server": args.server,
                                         "rows": [{"what": w, "pid": p, "ms_per_s": m} for w, p, m in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
