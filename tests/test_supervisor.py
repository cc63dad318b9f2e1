"""The supervisor with real processes: brokering, peer checks, crash safety, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.echo import Echo, host_port, who
from helpers.procs import REPO, wait_for
from reuseport_standby import client, protocol
from reuseport_standby.client import InstanceClient, connect
from reuseport_standby.errors import ProtocolError
from reuseport_standby.loadgen import Load, one_request

def test_unprivileged_instance_gets_listener_and_serves(supervisor) -> None:
    sup = supervisor(extra=["--group", "nogroup"])
    inst = Echo(sup, "primary", "--as-nobody").wait()
    st = sup.status()
    assert [i["uid"] for i in st["instances"]] == [65534]
    host, port = host_port(sup)
    assert who(host, port, 20) == Counter({f"primary {inst.proc.pid}": 20})
    inst.stop()


def test_peer_outside_group_is_refused(supervisor, short_tmp: Path) -> None:
    sup = supervisor()
    code = (
        "import os, sys; from reuseport_standby.client import InstanceClient\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n  InstanceClient('primary', sys.argv[1], control=sys.argv[2], connect_timeout=0).open()\n"
        "except Exception as e: print(type(e).__name__, e)\n"
    )
    run = lambda: subprocess.run([sys.executable, "-c", code, sup.service, sup.control], cwd=REPO,
                                 capture_output=True, text=True, timeout=30).stdout
    # The socket file itself (0660, root) keeps nobody out...
    assert run().startswith("ControlSocketDenied no permission")  # a SupervisorUnavailable, exit status 1
    # ...and with the file opened up, SO_PEERCRED still does.
    os.chmod(sup.control, 0o666)
    out = run()
    assert out.startswith("ProtocolError") and "may not control service" in out, out
    assert "refused control connection" in sup.log()
    assert sup.status()["instances"] == []


def test_role_mates_share_traffic_until_the_first_stops(supervisor) -> None:
    sup = supervisor()
    standby = Echo(sup, "standby").wait()
    old = Echo(sup, "primary").wait()
    new = Echo(sup, "primary").wait()
    host, port = host_port(sup)
    seen = who(host, port, 200)
    assert set(seen) == {f"primary {old.proc.pid}", f"primary {new.proc.pid}"}, seen
    old.stop()
    assert who(host, port, 50) == Counter({f"primary {new.proc.pid}": 50})
    new.stop()
    assert who(host, port, 20) == Counter({f"standby {standby.proc.pid}": 20})
    standby.stop()


def test_stop_deactivates_within_one_round_trip(supervisor) -> None:
    sup = supervisor()
    standby = Echo(sup, "standby").wait()
    host, port = host_port(sup)
    client = InstanceClient("primary", sup.service, control=sup.control)
    socks = client.open()
    client.ready()
    times = []
    t0 = time.perf_counter()
    client.stop()
    times.append(time.perf_counter() - t0)
    # The very next connection already goes elsewhere: nothing queues on the stopped instance.
    assert who(host, port, 30) == Counter({f"standby {standby.proc.pid}": 30})
    for s in socks:
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.accept()
        s.close()
    client.close()
    print(f"\nstop round trip: {times[0] * 1e3:.2f} ms")
    assert times[0] < 1.0
    standby.stop()


def test_supervisor_sigkill_under_load_loses_nothing_and_is_readopted(supervisor) -> None:
    sup = supervisor()
    standby = Echo(sup, "standby").wait()
    primary = Echo(sup, "primary").wait()
    prog_before = [a["prog_id"] for a in sup.status()["addresses"]]
    host, port = host_port(sup)
    with Load(host, port, concurrency=4, duration=30, max_requests=50_000) as load:
        time.sleep(0.5)
        sup.kill(signal.SIGKILL)
        time.sleep(1.0)  # traffic flows with no supervisor at all
        served_while_down = load.result.ok
        sup.start()
        wait_for(lambda: primary.state() == "active" and standby.state() == "active", 15, what="re-adoption")
        # Failover still works after re-adoption: replace the primary.
        primary.stop()
        primary = Echo(sup, "primary").wait()
        time.sleep(0.5)
        load.stop()
    result = load.result
    print("\n" + result.summary())
    assert result.failed == 0, result.failures
    assert served_while_down > 0
    st = sup.status()
    assert [a["prog_id"] for a in st["addresses"]] == prog_before, "pinned program re-adopted, not duplicated"
    assert sorted(i["state"] for i in st["instances"]) == ["active", "active"]
    assert who(host, port, 10) == Counter({f"primary {primary.proc.pid}": 10})
    primary.stop()
    standby.stop()


def _raw(sup, payload: bytes, fds: list[int] | None = None) -> dict:
    with connect(sup.control) as s:
        if fds:
            s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, __import__("array").array("i", fds))])
        else:
            s.sendmsg([payload])
        data, got, _ = protocol.recv(s)
        for fd in got:
            os.close(fd)
        assert data, f"no reply to {payload[:60]!r}:\n{sup.log()[-3000:]}"
        return json.loads(data)


def test_bad_input_gets_an_error_and_loses_nothing(supervisor) -> None:
    sup = supervisor()
    primary = Echo(sup, "primary").wait()
    slots_before = [a["slots"] for a in sup.status()["addresses"]]
    v = protocol.VERSION
    cases = {
        b"not json": "malformed",
        b"[1,2]": "malformed",
        json.dumps({"v": 99, "op": "hello"}).encode(): "version",
        json.dumps({"v": v, "op": "dance"}).encode(): "unknown_op",
        json.dumps({"v": v, "op": "hello", "role": "leader", "pid": 1}).encode(): "bad_role",
        json.dumps({"v": v, "op": "hello", "role": "primary", "pid": -4}).encode(): "bad_pid",
        json.dumps({"v": v, "op": "ready"}).encode(): "no_hello",
        b"{" + b" " * (protocol.MAX_MESSAGE + 10) + b"}": "too_large",
    }
    for payload, code in cases.items():
        reply = _raw(sup, payload)
        assert reply["ok"] is False and reply["error"] == code, (payload[:40], reply)
    # fds where none belong, and sockets that are not listening TCP sockets
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hello = json.dumps({"v": v, "op": "hello", "role": "primary", "pid": 1}).encode()
    assert _raw(sup, hello, [r])["error"] == "unexpected_fds"
    readopt = json.dumps({"v": v, "op": "readopt", "role": "primary", "pid": 1, "active": True}).encode()
    assert _raw(sup, readopt, [udp.fileno()])["error"] == "not_listening"
    assert _raw(sup, readopt, [r])["error"] == "not_listening"
    os.close(r), os.close(w), udp.close()
    # Everyone else is still served, and no slot moved.
    assert [a["slots"] for a in sup.status()["addresses"]] == slots_before
    host, port = host_port(sup)
    assert who(host, port, 5) == Counter({f"primary {primary.proc.pid}": 5})
    assert sup.proc.poll() is None
    primary.stop()


def test_slots_full_is_a_clear_error(control_plane) -> None:
    sup = control_plane()
    clients = []
    for _ in range(32):
        c = InstanceClient("standby", sup.service, control=sup.control, reconnect=False)
        for s in c.open():
            s.close()
        c.ready()
        clients.append(c)
    extra = InstanceClient("standby", sup.service, control=sup.control, reconnect=False)
    with pytest.raises(ProtocolError) as err:
        extra.open()
    assert err.value.code == "SlotsFull" and "standby slots" in str(err.value)
    assert str(err.value).count("(see docs/troubleshooting.md#slots-full)") == 1, err.value  # relayed, pointer once
    # a primary still fits
    p = InstanceClient("primary", sup.service, control=sup.control, reconnect=False)
    for s in p.open():
        s.close()
    assert p.ready()["ok"]
    for c in clients + [p]:
        c.close()


def test_client_reconnects_transparently(supervisor) -> None:
    """An app that started before a supervisor restart keeps its slot and can still stop cleanly."""
    sup = supervisor()
    client = InstanceClient("primary", sup.service, control=sup.control)
    socks = client.open()
    client.ready()
    sup.kill(signal.SIGKILL)
    sup.start()
    wait_for(lambda: [i["state"] for i in sup.status()["instances"]] == ["active"], 10, what="re-announce")
    client.stop()
    assert sup.status()["instances"][0]["state"] == "draining"
    assert all(not a["slots"] for a in sup.status()["addresses"])
    for s in socks:
        s.close()
    client.close()


def test_ipv6_and_several_addresses(supervisor) -> None:
    from conftest import free_port

    p4, p6 = free_port(), free_port(socket.AF_INET6)
    sup = supervisor(binds=[f"127.0.0.1:{p4}", f"[::1]:{p6}"])
    primary = Echo(sup, "primary").wait()
    assert who("127.0.0.1", p4, 5) == Counter({f"primary {primary.proc.pid}": 5})
    assert who("::1", p6, 5) == Counter({f"primary {primary.proc.pid}": 5})
    primary.stop()


def test_supervise_refuses_port_zero_and_bad_service() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reuseport_standby", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=30)

    r = cli("supervise", "--service", "x", "--bind", "127.0.0.1:0")
    assert r.returncode == 2 and "Port 0 would give every listener its own random port" in r.stderr
    r = cli("supervise", "--service", "bad.name", "--bind", "127.0.0.1:8000")
    assert r.returncode == 2 and "no dots" in r.stderr
    r = cli("status", "--service", "nonexistent", "--control", "/tmp/nonexistent.sock", "--pin-root", "/tmp/nowhere")
    assert r.returncode == 3 and "no supervisor answers" in r.stderr


def test_status_with_a_stopped_supervisor_reads_the_pins(supervisor) -> None:
    sup = supervisor()
    primary = Echo(sup, "primary").wait()
    host, port = host_port(sup)
    who(host, port, 3)
    sup.kill(signal.SIGKILL)
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "status", "--service", sup.service,
                        "--control", sup.control, "--pin-root", str(sup.pin_root), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    st = json.loads(r.stdout)
    assert st["source"] == "pins"
    (addr,) = st["addresses"]
    assert addr["counters"]["selected_primary"] == 3
    assert [s["role"] for s in addr["slots"]] == ["primary"], "the live primary's slot survives the supervisor"
    assert one_request(host, port)[0] == "ok"
    primary.stop()


def test_supervisor_notifies_systemd_when_ready(pin_root: Path, short_tmp: Path) -> None:
    """Type=notify: READY=1 arrives on $NOTIFY_SOCKET once the control socket answers."""
    from conftest import free_port

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(short_tmp / "notify")
    notify.bind(path)
    notify.settimeout(20)
    control = str(short_tmp / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "reuseport_standby", "supervise", "--service", "notifytest",
                             "--bind", f"127.0.0.1:{free_port()}", "--control", control, "--pin-root", str(pin_root)],
                            cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": path}, stderr=subprocess.DEVNULL)
    try:
        msg = notify.recv(4096).decode()
        assert msg.startswith("READY=1")
        assert client.query("notifytest", "ping", control)["ok"]
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode().startswith("STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
