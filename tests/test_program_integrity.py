"""Nobody but the supervisor decides where connections go: the group's program under attack.

A member of the control socket's group can say ``hello`` and hold listeners of the group.  Through
one it tried to replace the group's program (``SO_ATTACH_REUSEPORT_CBPF``, no privilege needed) and
took the port.  Now every handed listener is locked (SO_LOCK_FILTER), which the kernel checks on
both attach paths; detaching (``SO_DETACH_REUSEPORT_BPF``, which the lock does not cover) is undone
on the next tick, counted and shown.  Real kernel, real processes, loopback only; every loop is
bounded.  Run with ``-s`` for the figures.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest

from conftest import free_port
from helpers.echo import Echo, host_port
from helpers.procs import REPO
from reuseport_standby.kernel.sockets import Address, create_listener, lock_filter
from reuseport_standby.status import render

ATTACKER = REPO / "tests" / "apps" / "group_attacker.py"
TICK = 0.1  # the supervisor's health tick (supervisor/loop.py)


def ask(host: str, port: int, timeout: float = 5.0) -> str:
    """One request on a new connection: who answered ('primary PID', 'standby PID', 'thief'), or why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode() or "empty"
    except OSError as exc:
        return f"failed: {type(exc).__name__}"


def attacker(sup, action: str, seconds: float = 1.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ATTACKER), sup.service, sup.control, action, str(seconds)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def integrity(sup) -> dict:
    return sup.status()["addresses"][0]["program_integrity"]


def restorations_metric(mport: int, sup) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "reuseport_standby_program_restorations_total" and sample.labels["address"] == sup.binds[0]:
                return sample.value
    raise AssertionError("no reuseport_standby_program_restorations_total in /metrics")


def cbpf_return(k: int) -> tuple[bytes, object]:
    import ctypes

    insns = (ctypes.c_ubyte * 8)(*struct.pack("=HBBI", 0x06, 0, 0, k))
    return struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insns)), insns


class Thief:
    """A member of the group the test itself holds (root, so the kernel lets it join), answering 'thief'."""

    def __init__(self, address: Address) -> None:
        self.sock = create_listener(address)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthief")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_group_member_cannot_attach_a_program(supervisor) -> None:
    """nobody, in --group, says hello and attaches a CBPF program through each listener it was handed:
    the kernel refuses (EPERM), and the port stays the primary's."""
    sup = supervisor(extra=["--group", "nogroup"])
    primary = Echo(sup, "primary").wait()
    Echo(sup, "standby").wait()
    result = finish(attacker(sup, "attach"))
    assert result == {"uid": 65534, "attach": ["EPERM"]}, result
    host, port = host_port(sup)
    answers = Counter(ask(host, port) for _ in range(40))
    assert answers == Counter({f"primary {primary.proc.pid}": 40}), answers


def test_contrast_an_unlocked_member_takes_the_port_until_the_next_tick(supervisor) -> None:
    """What the lock prevents, shown on a member without it: while it keeps attaching a foreign program,
    that program has the port; within two ticks of its last attach, the supervisor's re-attach has given
    it back to the primary."""
    sup = supervisor()
    primary = Echo(sup, "primary").wait()
    Echo(sup, "standby").wait()
    host, port = host_port(sup)
    thief = Thief(Address.parse(sup.binds[0]))
    keep: list[object] = []

    def attach_foreign(index: int) -> None:
        prog, insns = cbpf_return(index)
        keep.append(insns)
        thief.sock.setsockopt(socket.SOL_SOCKET, 51, prog)  # SO_ATTACH_REUSEPORT_CBPF

    class Attacking:
        """Attach the program returning ``index`` every millisecond (bounded: 30 s), so that which member
        it names is seen whatever the machine's speed (a slow VM may take longer than a tick to connect)."""

        def __init__(self, index: int) -> None:
            self.index, self.stop = index, threading.Event()
            self.thread = threading.Thread(target=self._loop, daemon=True)

        def _loop(self) -> None:
            deadline = time.monotonic() + 30
            while not self.stop.is_set() and time.monotonic() < deadline:
                attach_foreign(self.index)
                time.sleep(0.001)

        def __enter__(self) -> "Attacking":
            attach_foreign(self.index)
            self.thread.start()
            return self

        def __exit__(self, *exc: object) -> None:
            self.stop.set()
            self.thread.join(5)

    try:
        # A classic program returns an index into the kernel's member list: find the thief's.  An index
        # past the end falls back to the kernel's hash (the thief 1 time in N), hence three of three.  A
        # connection an index gives the anchor is handed on by the supervisor, whose shutdown() and
        # listen() move the anchor to the end of the list and the last member into its place: an index
        # that reached the thief once is asked again.
        seen: list[tuple[int, list[str]]] = []
        index = None
        for k in [*range(8), *range(8)]:
            for _ in range(3):
                with Attacking(k):
                    answers = [ask(host, port).split()[0] for _ in range(3)]
                seen.append((k, answers))
                if answers == ["thief"] * 3:
                    index = k
                elif "thief" in answers:
                    continue
                break
            if index is not None:
                break
            time.sleep(2 * TICK)
        assert index is not None, f"no index of the member list reached the thief: {seen}"
        with Attacking(index):
            during = Counter(ask(host, port).split()[0] for _ in range(20))
        time.sleep(2.5 * TICK)
        later = Counter(ask(host, port) for _ in range(20))
        print(f"\nforeign program returning {index}: answers while it kept attaching: {dict(during)}; "
              f"two ticks after its last attach: {dict(later)}")
        assert during["thief"] >= 15, f"the foreign program had no effect: {during}"
        assert later == Counter({f"primary {primary.proc.pid}": 20}), later

        lock_filter(thief.sock)
        with pytest.raises(PermissionError):
            attach_foreign(index)
    finally:
        thief.close()


def test_detach_loop_is_undone_every_tick_counted_and_shown(supervisor) -> None:
    """nobody, in --group, detaches the group's program every millisecond for 1.5 s while a client
    sends requests.  The program is back within one tick of the loop's end, the restorations are in
    ``status`` and the log, and nothing waiting on the anchor or on the attacker's listener is lost."""
    mport = free_port()
    sup = supervisor(extra=["--group", "nogroup", "--metrics", f"127.0.0.1:{mport}"])
    primary = Echo(sup, "primary").wait()
    standby = Echo(sup, "standby").wait()
    host, port = host_port(sup)
    before = integrity(sup)
    assert before["restorations"] == 0

    during: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            during.append((t, ask(host, port)))

    att = attacker(sup, "detach-loop", 1.5)
    assert att.stdout is not None and att.stdout.readline().strip() == "looping", att.stderr.read() if att.stderr else ""
    # A connection the kernel gives the attacker's listener waits there until it exits: many clients.
    threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    result = finish(att)
    stop.set()
    for t in threads:
        t.join(20)
    time.sleep(2 * TICK)
    after = Counter(ask(host, port) for _ in range(20))
    status = integrity(sup)
    kinds = Counter(a.split()[0] for _, a in during)
    print(f"\nattacker: {result}; {len(during)} requests during the loop: {dict(kinds)}; "
          f"afterwards: {dict(after)}; status: {status}")
    assert result["detached"] >= 5, result  # one per supervisor tick: each re-attach is undone
    assert kinds["standby"] > 0, f"the detach loop had no effect (the contrast): {kinds}"
    assert after == Counter({f"primary {primary.proc.pid}": 20}), after
    assert status["restorations"] >= 1 and status["bypassed_connections"] >= 1, status
    assert "found detached from the group" in sup.log()
    assert restorations_metric(mport, sup) == status["restorations"]
    shown = render(sup.status())
    assert f"PROGRAM RESTORED {status['restorations']} time(s)" in shown, shown
    # What the attacker can still cost: a detach that lands between the supervisor's re-attach and
    # its shutdown() of the anchor (microseconds on the host, longer under emulation in the VM) resets
    # what waited on the anchor, i.e. connections the detach sent there (docs/security.md).
    failed = [a for _, a in during if a.startswith("failed") or a == "empty"]
    print(f"lost during the detach loop: {len(failed)} of {len(during)} {dict(Counter(failed))}")
    assert len(failed) <= max(2, len(during) // 20, status["bypassed_connections"]), \
        f"{len(failed)} of {len(during)} lost ({status['bypassed_connections']} bypassed): {Counter(failed)}"
    standby.stop()
    primary.stop()
