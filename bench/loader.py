"""Cost of the kernel core: load time, memory, and run time per selection.

Run as root: ``python bench/loader.py [--connections N] [--json PATH]``.
Figures are measured on the machine at hand; nothing here is a pass/fail
test (targets in issue 2: load < 50 ms, RSS < 40 MB, < 200 ns/selection).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reuseport_standby.kernel import libbpf  # noqa: E402
from reuseport_standby.kernel.layout import PARKING_SLOT, Config, Role  # noqa: E402
from reuseport_standby.kernel.group import Group  # noqa: E402
from reuseport_standby.kernel.pins import DEFAULT_PIN_ROOT  # noqa: E402
from reuseport_standby.kernel.sockets import Address, create_listener  # noqa: E402
from reuseport_standby.supervisor.options import SuperviseOptions  # noqa: E402

BASE = Path(DEFAULT_PIN_ROOT) / f"bench-{uuid.uuid4().hex[:8]}"


def remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            remove(child)
        path.rmdir()
    elif path.exists():
        path.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_times(n: int) -> dict[str, float]:
    fresh, readopt = [], []
    for i in range(n):
        pin = BASE / f"load{i}"
        t0 = time.perf_counter()
        Group.open(pin).close()
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Group.open(pin).close()
        readopt.append(time.perf_counter() - t0)
    return {"fresh_median_ms": statistics.median(fresh) * 1e3, "fresh_max_ms": max(fresh) * 1e3,
            "readopt_median_ms": statistics.median(readopt) * 1e3}


def rss() -> dict[str, float]:
    """Peak RSS (VmHWM) of a fresh interpreter: bare, after import, after loading one group."""
    code = (
        "import sys\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "base = hwm(); sys.path.insert(0, sys.argv[2]); from reuseport_standby.kernel.group import Group\n"
        "imp = hwm(); g = Group.open(sys.argv[1]); print(base, imp, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BASE / "rss"), str(Path(__file__).resolve().parent.parent)],
                         check=True, capture_output=True, text=True).stdout.split()
    base, imp, loaded = (int(x) / 1024 for x in out)
    return {"python_bare_mb": base, "after_import_mb": imp, "after_load_mb": loaded, "load_delta_mb": loaded - imp}


def supervisor_figures(runs: int = 5, loader: str = "libbpf") -> dict[str, float]:
    """Start-to-ready time (exec to first answered ping) and RSS of ``supervise``, two addresses."""
    from reuseport_standby import client
    from reuseport_standby.errors import SupervisorUnavailable

    times, rss_kb = [], []
    for i in range(runs):
        service = f"bench{uuid.uuid4().hex[:6]}"
        control = f"/tmp/{service}.sock"
        port = free_port()
        t0 = time.perf_counter()
        options = SuperviseOptions(service=service, binds=(f"127.0.0.1:{port}", f"[::1]:{port}"), control=control,
                                   pin_root=str(BASE / "sup"), loader=loader)
        proc = subprocess.Popen(options.command(),
                                cwd=Path(__file__).resolve().parent.parent,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    client.query(service, "ping", control, timeout=1)
                    break
                except SupervisorUnavailable:
                    time.sleep(0.002)
            times.append(time.perf_counter() - t0)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss_kb.append(next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")))
        finally:
            proc.terminate()
            proc.wait(10)
    return {"start_to_ready_median_ms": statistics.median(times) * 1e3, "peak_rss_mb": statistics.median(rss_kb) / 1024}


def selection_cost(connections: int) -> dict[str, float]:
    """Average program run time per selection, by what the program has to probe."""
    lib = libbpf.load()
    stats_fd = lib.lib.bpf_enable_stats(libbpf.BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        raise OSError(-stats_fd, "bpf_enable_stats")
    results: dict[str, float] = {}
    try:
        cases = {
            "primary_live": lambda g, p, s, a: (g.set_slot(0, p), g.set_slot(Role.STANDBY.slot_range[0], s),
                                                g.write_config(Config().with_live(g.slots()))),
            "standby_only": lambda g, p, s, a: (g.set_slot(Role.STANDBY.slot_range[0], s),
                                                g.write_config(Config().with_live(g.slots()))),
            "parking_only": lambda g, p, s, a: (g.set_slot(PARKING_SLOT, a), g.write_config(Config())),
            # Worst case: the table lists primaries the kernel already emptied (SIGKILL, before user space heard).
            "stale_table_2_empty_primaries": lambda g, p, s, a: (g.set_slot(Role.STANDBY.slot_range[0], s),
                                                                 g.write_config(Config(live=((0, 1), (Role.STANDBY.slot_range[0],))))),
        }
        for name, setup in cases.items():
            address = Address("127.0.0.1", free_port())
            with Group.open(BASE / f"sel-{name}") as g:
                anchor, primary, standby = (create_listener(address, 4096) for _ in range(3))
                g.attach(anchor)
                setup(g, primary, standby, anchor)
                before = g.prog_info
                for _ in range(connections):
                    c = socket.create_connection(("127.0.0.1", address.port))
                    c.close()
                    for lsn in (primary, standby, anchor):
                        lsn.setblocking(False)
                        try:
                            while True:
                                lsn.accept()[0].close()
                        except BlockingIOError:
                            pass
                after = g.prog_info
                runs = after.run_cnt - before.run_cnt
                results[f"{name}_ns"] = (after.run_time_ns - before.run_time_ns) / runs if runs else float("nan")
                results[f"{name}_runs"] = runs
                for s in (anchor, primary, standby):
                    s.close()
    finally:
        os.close(stats_fd)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--bcc", action="store_true", help="also measure the supervisor with the BCC loader")
    args = ap.parse_args()
    try:
        figures = {"kernel": os.uname().release, "libbpf": libbpf.load().version,
                   "load": load_times(args.loads), "rss": rss(), "supervisor": supervisor_figures(),
                   "supervisor_bcc": supervisor_figures(3, "bcc") if args.bcc else None, "selection": selection_cost(args.connections)}
    finally:
        remove(BASE)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
