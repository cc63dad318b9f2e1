"""Cost of the kernel core: load time, memory, and run time per selection.

Run as root: ``python bench/loader.py [--connections N] [--json PATH]``;
``--selection-only`` measures just the program's run time, side by side
with the former probe-loop program (bench/former_program.py), in one run.
Figures are measured on the machine at hand; nothing here is a pass/fail
test (targets: load < 50 ms, RSS < 40 MB (issue 2), <= 150 ns per
selection in every case (issue 19)).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reuseport_standby.kernel import libbpf  # noqa: E402
from reuseport_standby.kernel.layout import PARKING_SLOT, Config, LiveTable, Role  # noqa: E402
from reuseport_standby.kernel.group import Group  # noqa: E402
from reuseport_standby.kernel.pins import DEFAULT_PIN_ROOT, remove_tree  # noqa: E402
from reuseport_standby.kernel.sockets import Address, create_listener  # noqa: E402
from reuseport_standby.supervisor.options import SuperviseOptions  # noqa: E402

BASE = Path(DEFAULT_PIN_ROOT) / f"bench-{uuid.uuid4().hex[:8]}"
REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def _bench_module(name: str) -> Any:
    """A sibling module of bench/ (not a package), by path, once: this file is also loaded by bench/restarts.py."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


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


P0, S0 = Role.PRIMARY.slot_range[0], Role.STANDBY.slot_range[0]


@dataclass(frozen=True)
class Case:
    """One state of the slots, as each program's user space would describe it."""

    name: str
    filled: tuple[int, ...]  #: slots holding a listener (parking always does)
    live: LiveTable  #: the current program's live-slot table (it may list slots the kernel emptied)
    spans: tuple[int, int]  #: the former program's spans: slots [base, base + span) of each range probed
    what: str


SIDE_BY_SIDE = (
    Case("primary_live", (P0, S0), ((P0,), (S0,)), (1, 1), "a primary and a standby live"),
    Case("standby_only", (S0,), ((), (S0,)), (0, 1), "the standby alone"),
    Case("parking_only", (), ((), ()), (0, 0), "no instance: the anchor in parking"),
    Case("hole", (P0, P0 + 2, S0), ((P0, P0 + 2), (S0,)), (3, 1),
         "primary slots 0 and 2 of 3 live (after a rolling restart); the former probes past slot 1"),
    Case("worst", (S0,), ((P0, P0 + 1), (S0,)), (32, 1),
         "current: both chosen table entries emptied by the kernel (SIGKILL); former: 32 empty primary slots probed"),
)


class _Setup:
    """One program loaded for one case: its group, listeners on a port of its own, its config written."""

    def __init__(self, group: Group, case: Case, write: Callable[[Group, Case], None]) -> None:
        self.group, self.case = group, case
        self.address = Address("127.0.0.1", free_port())
        self.anchor = create_listener(self.address, 4096)
        group.attach(self.anchor)
        group.set_slot(PARKING_SLOT, self.anchor)
        self.listeners = {slot: create_listener(self.address, 4096) for slot in case.filled}
        for slot, lsn in self.listeners.items():
            group.set_slot(slot, lsn)
        write(group, case)
        for lsn in (self.anchor, *self.listeners.values()):
            lsn.setblocking(False)

    def drive(self, connections: int) -> tuple[int, int, dict[int, int]]:
        """``connections`` back to back: (run time ns, runs, connections accepted per slot)."""
        before = self.group.prog_info
        for _ in range(connections):
            socket.create_connection(("127.0.0.1", self.address.port)).close()
        after = self.group.prog_info
        accepted = {slot: _drain(lsn) for slot, lsn in ((PARKING_SLOT, self.anchor), *self.listeners.items())}
        return after.run_time_ns - before.run_time_ns, after.run_cnt - before.run_cnt, accepted

    def close(self) -> None:
        for lsn in (self.anchor, *self.listeners.values()):
            lsn.close()
        self.group.close()


def _drain(lsn: socket.socket) -> int:
    n = 0
    try:
        while True:
            lsn.accept()[0].close()
            n += 1
    except BlockingIOError:
        return n


def side_by_side(rounds: int, connections: int) -> dict[str, Any]:
    """ns per selection of the current and the former program, case by case, in alternating rounds.

    Each round drives ``connections`` back to back at every case of both
    programs, the program going first alternating between rounds, so that
    the machine's drifts (other jobs on shared cores, frequency) fall on
    both alike.  Reported: the median over rounds of each program's ns per
    selection and of the per-round ratio current/former, and, for the hole
    case, each live slot's share of the connections.
    """
    former = _bench_module("former_program")
    lib = libbpf.load()
    stats_fd = lib.lib.bpf_enable_stats(libbpf.BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        raise OSError(-stats_fd, "bpf_enable_stats")
    setups: dict[tuple[str, str], _Setup] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rs-former-") as tmp:
            obj = former.build(Path(tmp), REPO)
            for case in SIDE_BY_SIDE:
                setups["current", case.name] = _Setup(
                    Group.open(BASE / f"cur-{case.name}"), case, lambda g, c: g.write_config(Config(live=c.live)))
                setups["former", case.name] = _Setup(
                    former.open_group(obj, BASE / f"former-{case.name}"), case, lambda g, c: former.write_config(g, c.spans))
        ns: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
        ratios: dict[str, list[float]] = {case.name: [] for case in SIDE_BY_SIDE}
        accepted: dict[tuple[str, str], dict[int, int]] = {key: {} for key in setups}
        for r in range(rounds):
            order = ("current", "former") if r % 2 == 0 else ("former", "current")
            for case in SIDE_BY_SIDE:
                this: dict[str, float] = {}
                for program in order:
                    run_ns, runs, got = setups[program, case.name].drive(connections)
                    this[program] = run_ns / runs if runs else float("nan")
                    ns[program, case.name].append(this[program])
                    for slot, n in got.items():
                        accepted[program, case.name][slot] = accepted[program, case.name].get(slot, 0) + n
                ratios[case.name].append(this["current"] / this["former"])
        out: dict[str, Any] = {"rounds": rounds, "connections_per_round": connections,
                               "former_commit": former.FORMER_COMMIT, "cases": {}}
        for case in SIDE_BY_SIDE:
            row: dict[str, Any] = {"what": case.what}
            for program in ("current", "former"):
                xs = ns[program, case.name]
                row[f"{program}_ns"] = statistics.median(xs)
                row[f"{program}_ns_range"] = [min(xs), max(xs)]
                total = sum(accepted[program, case.name].values())
                row[f"{program}_share"] = {str(slot): n / total for slot, n in sorted(accepted[program, case.name].items()) if n}
            row["ratio"] = statistics.median(ratios[case.name])
            out["cases"][case.name] = row
        return out
    finally:
        for setup in setups.values():
            setup.close()
        os.close(stats_fd)


def print_side_by_side(result: dict[str, Any]) -> None:
    print(f"ns per selection, median of {result['rounds']} alternating rounds of "
          f"{result['connections_per_round']} connections (former: {result['former_commit'][:7]})", file=sys.stderr)
    print(f"{'case':14} {'current':>9} {'former':>9} {'ratio':>6}  shares (current | former)", file=sys.stderr)
    for name, row in result["cases"].items():
        shares = " | ".join(", ".join(f"{s}: {v:.1%}" for s, v in row[f"{p}_share"].items()) for p in ("current", "former"))
        print(f"{name:14} {row['current_ns']:9.0f} {row['former_ns']:9.0f} {row['ratio']:6.2f}  {shares}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds of the side-by-side (default 15)")
    ap.add_argument("--round-connections", type=int, default=400,
                    help="connections per case, program and round in the side-by-side (default 400)")
    ap.add_argument("--selection-only", action="store_true", help="only the side-by-side selection cost")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--bcc", action="store_true", help="also measure the supervisor with the BCC loader")
    args = ap.parse_args()
    former = _bench_module("former_program")
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kernel": os.uname().release,
                               "libbpf": libbpf.load().version, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    try:
        if not args.selection_only:
            figures.update({"load": load_times(args.loads), "rss": rss(), "supervisor": supervisor_figures(),
                            "supervisor_bcc": supervisor_figures(3, "bcc") if args.bcc else None,
                            "selection": selection_cost(args.connections)})
        try:
            figures["side_by_side"] = side_by_side(args.rounds, args.round_connections)
        except former.FormerUnavailable as exc:
            print(f"side-by-side skipped: {exc}", file=sys.stderr)
    finally:
        remove_tree(BASE)
    print(json.dumps(figures, indent=2))
    if "side_by_side" in figures:
        print_side_by_side(figures["side_by_side"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
