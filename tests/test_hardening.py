"""No peer can stall or crash the supervisor (issue 14): long replies, peers that do not read,
file-descriptor exhaustion, per-uid limits, and failures anywhere in the loop."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.procs import REPO, wait_for
from reuseport_standby import client, protocol
from reuseport_standby.client import InstanceClient, connect, request
from reuseport_standby.errors import ProtocolError, SupervisorUnavailable

LONG_NAME = "n" * 128


def _timed_status(sup, timeout: float = 2.0) -> float:
    """Seconds one `status` over a fresh connection takes (raises if it is not answered within ``timeout``)."""
    t0 = time.perf_counter()
    client.query(sup.service, "status", sup.control, timeout=timeout)
    return time.perf_counter() - t0


def _as_nobody(code: str) -> str:
    """Run ``code`` as nobody:nogroup, everything imported first (this interpreter lives under /root)."""
    return ("import json, os, sys, socket\n"
            "from reuseport_standby import client, protocol\n"
            "from reuseport_standby.client import InstanceClient, connect, request\n"
            "from reuseport_standby.errors import ProtocolError, SupervisorUnavailable\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "service, control = sys.argv[1:3]\n" + code)


def _nobody(sup, code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _as_nobody(code), sup.service, sup.control, *args], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen, timeout: float = 30.0) -> object:
    """The JSON line a child prints once it has done its part (it then waits for its stdin to close)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        raise AssertionError(f"child said nothing: {proc.stderr.read()[-3000:]}")
    return json.loads(result[0])


def _finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- 1. replies longer than one message (no kernel needed) ---------------------------------------------

def test_long_reply_travels_in_chunks_and_is_reassembled() -> None:
    """A reply over MAX_MESSAGE goes out as numbered chunks, none over the limit; the client joins them."""
    reply = {"ok": True, "status": {"instances": [{"id": i, "name": LONG_NAME} for i in range(600)]}}
    frames = protocol.frames(reply, [7])
    assert len(frames) > 5 and all(len(data) <= protocol.MAX_MESSAGE for data, _ in frames)
    assert [fds for _, fds in frames] == [[7]] + [[]] * (len(frames) - 1), "fds ride on the first chunk only"
    assert protocol.frames({"ok": True}, [7]) == [(protocol.encode({"ok": True}), [7])], "a short reply is unchanged"

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    carried = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def serve() -> None:
        raw, _, _ = protocol.recv(b)
        assert protocol.parse_request(raw).op == "status"
        protocol.send_reply(b, reply, [carried.fileno()])

    t = threading.Thread(target=serve)
    t.start()
    try:
        got, socks = request(a, {"op": "status"}, timeout=5)
    finally:
        t.join(5)
    assert got == {"v": protocol.VERSION, **reply}
    assert [s.type for s in socks] == [socket.SOCK_STREAM]
    for s in [*socks, carried, a, b]:
        s.close()


def test_a_broken_chunk_sequence_is_an_error() -> None:
    frames = [data for data, _ in protocol.frames({"ok": True, "x": "y" * 40_000})]
    assert len(frames) == 4
    with pytest.raises(ProtocolError, match="chunk 2 of 4"):
        protocol.join_reply(frames[0], iter([frames[1], frames[3]]).__next__)
    with pytest.raises(ProtocolError, match="began with chunk 1"):
        protocol.join_reply(frames[1], iter(frames[2:]).__next__)
    assert json.loads(protocol.join_reply(frames[0], iter(frames[1:]).__next__))["x"] == "y" * 40_000


# -- 1. long replies from a live supervisor ---------------------------------------------------------------------

def test_status_of_many_long_named_instances_is_answered(control_plane) -> None:
    """Hellos with 128-character names made `status` longer than 16 KiB, which ended the supervisor."""
    sup = control_plane()
    clients = []
    for _ in range(64):
        c = InstanceClient("standby", sup.service, control=sup.control, name=LONG_NAME, reconnect=False)
        for s in c.open():
            s.close()
        clients.append(c)
    st = sup.status()
    assert len(protocol._dump({"ok": True, "status": st})) > protocol.MAX_MESSAGE
    assert [i["name"] for i in st["instances"]] == [LONG_NAME] * 64
    assert sup.proc.poll() is None
    for c in clients:
        c.close()


HEAD_AND_WORKERS = """
import json, os, sys
from reuseport_standby.client import InstanceClient
service, control, role = sys.argv[1:4]
name = "n" * 128
head = InstanceClient(role, service, control=control, scope="worker", name=name, reconnect=False)
for s in head.open():
    s.close()
workers = []
for _ in range(16):
    w = InstanceClient(role, service, control=control, parent=os.getpid(), name=name, reconnect=False)
    for s in w.open():
        s.close()
    w.ready()
    workers.append(w)
print(json.dumps("ready"), flush=True)
sys.stdin.read()
"""


def test_status_of_a_worker_scope_rolling_reload_is_answered(control_plane) -> None:
    """The longest status the protocol produces: 2 addresses x 2 instances per role x 16 workers, long names.
    The client library and the `status` and `check` commands read it."""
    from conftest import free_port

    sup = control_plane(binds=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    heads = []
    for role in ("primary", "primary", "standby", "standby"):
        heads.append(subprocess.Popen([sys.executable, "-c", HEAD_AND_WORKERS, sup.service, sup.control, role],
                                      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        for h in heads:
            assert _first_line(h) == "ready"
        t0 = time.perf_counter()
        st = sup.status()
        took = time.perf_counter() - t0
        size = len(protocol._dump({"ok": True, "status": st}))
        print(f"\nstatus of 4 instances x 16 workers x 2 addresses: {size} bytes in "
              f"{len(protocol.frames({'ok': True, 'status': st}))} chunks, {took * 1e3:.1f} ms")
        assert size > 2 * protocol.MAX_MESSAGE
        assert sum(len(a["slots"]) for a in st["addresses"]) == 2 * 64
        assert sorted(i["state"] for i in st["instances"]).count("active") == 68
        cli = [sys.executable, "-m", "reuseport_standby"]
        where = ["--service", sup.service, "--control", sup.control]
        r = subprocess.run([*cli, "status", *where, "--json"], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["instances"]) == 68
        r = subprocess.run([*cli, "check", *where, "--pid", str(heads[0].pid)], cwd=REPO, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert sup.proc.poll() is None
    finally:
        for h in heads:
            _finish(h)


# -- 2. a peer that does not read its replies ---------------------------------------------------------------------

def test_a_peer_that_does_not_read_is_dropped_and_never_waited_for(control_plane) -> None:
    sup = control_plane()
    flooder = connect(sup.control)
    flooder.setblocking(False)
    req = protocol.encode({"op": "status"})
    sent, latencies, refused = 0, [], False
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline and not refused:
        for _ in range(500):
            try:
                flooder.send(req)
                sent += 1
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError):
                refused = True  # the supervisor hung up on it
                break
        latencies.append(_timed_status(sup))
        time.sleep(0.05)
    latencies.sort()
    print(f"\nflooder sent {sent} status requests without reading; other clients' status: "
          f"median {latencies[len(latencies) // 2] * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms "
          f"over {len(latencies)} requests")
    assert refused, f"the flooder was never dropped:\n{sup.log()[-2000:]}"
    assert sent >= 200
    assert latencies[-1] < 1.0
    assert "did not read its replies" in sup.log()
    assert sup.proc.poll() is None
    flooder.close()


# -- 3. file descriptors ------------------------------------------------------------------------------------------

def test_out_of_file_descriptors_pauses_accepting_and_recovers(control_plane) -> None:
    sup = control_plane()
    observer = connect(sup.control)
    request(observer, {"op": "ping"}, timeout=2)
    resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE, (128, 128))
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while len(idle) < 400 and time.monotonic() < deadline:  # until the limit, and the backlog behind it, are full
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(sup.control)
                idle.append(s)
            except BlockingIOError:  # the control socket's backlog is full
                s.close()
                if "cannot accept a control connection" in sup.log():
                    break
                time.sleep(0.01)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                break
        assert sup.proc.poll() is None, f"the supervisor exited:\n{sup.log()[-2000:]}"
        assert "cannot accept a control connection" in sup.log()
        assert len(idle) > 128
        latencies = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert request(observer, {"op": "status"}, timeout=1)[0]["ok"]
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        print(f"\n{len(idle)} idle connections against RLIMIT_NOFILE 128: a connected client's status max "
              f"{max(latencies) * 1e3:.1f} ms")
        assert max(latencies) < 1.0
        assert sup.proc.poll() is None
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: _timed_status(sup, 1.0) < 1.0, 10, what="accepting again")
    assert "accepting control connections again" in sup.log()
    assert sup.proc.poll() is None
    observer.close()


CAPPED = """
held = [connect(control) for _ in range(int(sys.argv[3]))]
for c in held:
    request(c, {"op": "ping"}, timeout=5)
out = []
try:
    client.query(service, "ping", control, timeout=5)
    out.append("ok")
except ProtocolError as e:
    out.append(e.code)
held.pop().close()
for _ in range(50):  # the supervisor sees the close within a loop turn
    try:
        client.query(service, "ping", control, timeout=5)
        out.append("ok")
        break
    except ProtocolError as e:
        import time; time.sleep(0.05)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("cap", [None, 8])
def test_connections_per_uid_are_capped_root_exempt(supervisor, cap: int | None) -> None:
    """One member of --group cannot hold every file descriptor the supervisor has (default: 128 connections)."""
    sup = supervisor(extra=["--group", "nogroup", *(["--max-connections-per-uid", str(cap)] if cap else [])])
    child = _nobody(sup, CAPPED, str(cap or 128))
    try:
        assert _first_line(child) == ["too_many_connections", "ok"]
        mine = [connect(sup.control) for _ in range((cap or 128) + 20)]  # root is exempt
        for c in mine:
            assert request(c, {"op": "ping"}, timeout=2)[0]["ok"]
        for c in mine:
            c.close()
        assert "control connections" in sup.log()
    finally:
        _finish(child)


# -- 4. slots per uid -------------------------------------------------------------------------------------------

QUOTA = """
def hello(role, **kw):
    c = InstanceClient(role, service, control=control, reconnect=False, **kw)
    try:
        for s in c.open():
            s.close()
        return c, "ok"
    except ProtocolError as e:
        return None, e.code
held, out = [], []
for role in ("standby", "standby", "standby", "primary", "primary", "primary"):
    c, r = hello(role)
    out.append(r)
    held += [c] if c else []
held[0].close()  # one standby stops: there is room for another
c, r = hello("standby")
out.append(r)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


def test_one_user_holds_at_most_two_instances_of_a_role(supervisor) -> None:
    """Else one member of --group could take every free standby slot, and the next reload would fail."""
    sup = supervisor(extra=["--group", "nogroup"])
    child = _nobody(sup, QUOTA)
    try:
        assert _first_line(child) == ["ok", "ok", "quota", "ok", "ok", "quota", "ok"]
        # The service's own reload (root here) still finds its slots.
        c = InstanceClient("standby", sup.service, control=sup.control, reconnect=False)
        for s in c.open():
            s.close()
        assert c.ready()["state"] == "active"
        c.close()
        assert "the most one user may" in sup.log()
    finally:
        _finish(child)


WORKER_QUOTA = """
head = InstanceClient("standby", service, control=control, scope="worker", reconnect=False)
for s in head.open():
    s.close()
me = os.getpid()
report_r, report_w = os.pipe()
hold_r, hold_w = os.pipe()
kids = []
for _ in range(17):  # real children, as gunicorn's workers are
    pid = os.fork()
    if pid == 0:
        os.close(hold_w)
        w = InstanceClient("standby", service, control=control, parent=me, reconnect=False)
        try:
            for s in w.open():
                s.close()
            r = "ok"
        except ProtocolError as e:
            r = e.code
        os.write(report_w, (r + "\\n").encode())
        os.read(hold_r, 1)
        os._exit(0)
    kids.append(pid)
os.close(hold_r)
with os.fdopen(report_r) as f:
    codes = sorted(f.readline().strip() for _ in kids)
out = [codes.count("ok"), codes.count("quota")]
# Not a child of the instance it names: counts as an instance of its own (the head is the first).
fakes = []
for _ in range(2):
    c = InstanceClient("standby", service, control=control, parent=me, reconnect=False)
    try:
        for s in c.open():
            s.close()
        out.append("ok")
        fakes.append(c)
    except ProtocolError as e:
        out.append(e.code)
print(json.dumps(out), flush=True)
sys.stdin.read()
os.close(hold_w)
for pid in kids:
    os.waitpid(pid, 0)
"""


def test_worker_scope_quota_is_two_instances_worth_of_workers(supervisor) -> None:
    sup = supervisor(extra=["--group", "nogroup"])
    child = _nobody(sup, WORKER_QUOTA)
    try:
        assert _first_line(child) == [16, 1, "ok", "quota"]
    finally:
        _finish(child)


# -- 5. failures anywhere in the loop ------------------------------------------------------------------------------

@pytest.fixture
def inproc(pin_root: Path, short_tmp: Path):
    """A supervisor in this process (its loop in a thread), so a test can make its parts fail."""
    import uuid

    from conftest import free_port
    from reuseport_standby.kernel.sockets import Address
    from reuseport_standby.supervisor import SuperviseOptions, Supervisor

    sup = Supervisor(SuperviseOptions(f"t{uuid.uuid4().hex[:10]}", (Address("127.0.0.1", free_port()),),
                                      control=str(short_tmp / "in.sock"), pin_root=str(pin_root)))
    sup.start()
    loop = threading.Thread(target=sup.serve_forever, kwargs={"install_signals": False, "notify": False}, daemon=True)
    loop.start()
    yield sup, loop
    sup.stop()
    loop.join(5)
    sup.close()


def _alive(sup, loop: threading.Thread) -> None:
    assert loop.is_alive(), "the supervisor's loop ended"
    t0 = time.perf_counter()
    assert client.query(sup.service, "ping", sup.control_path, timeout=1)["ok"]
    assert time.perf_counter() - t0 < 1.0


def test_a_failure_anywhere_ends_that_peer_not_the_loop(inproc, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    sup, loop = inproc
    caplog.set_level("INFO", logger="reuseport_standby")

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    # accept: the new peer is closed, the loop goes on
    monkeypatch.setattr(sup, "_refusal", boom)
    with pytest.raises(SupervisorUnavailable):
        client.query(sup.service, "ping", sup.control_path, timeout=2)
    monkeypatch.undo()
    _alive(sup, loop)

    # writing: a reply that cannot be encoded becomes an `internal` error
    from reuseport_standby.supervisor import view

    monkeypatch.setattr(view, "status", lambda broker: {"not json": {1, 2}})
    with pytest.raises(ProtocolError) as err:
        client.query(sup.service, "status", sup.control_path, timeout=2)
    assert err.value.code == "internal"
    monkeypatch.undo()
    _alive(sup, loop)

    # a peer's end: it is forgotten even when deactivating it fails
    wait_for(lambda: not sup.instances, 2, what="the earlier peers to be gone")
    monkeypatch.setattr(sup.broker, "deactivate", boom)
    c = connect(sup.control_path)
    request(c, {"op": "ping"}, timeout=2)
    assert len(sup.instances) == 1
    c.close()
    wait_for(lambda: not sup.instances, 2, what="the peer to be forgotten")
    monkeypatch.undo()
    _alive(sup, loop)

    # timers: one that fails is logged; the loop and the other timers go on
    monkeypatch.setattr(sup, "check_health", boom)
    time.sleep(0.3)
    _alive(sup, loop)
    monkeypatch.undo()
    assert caplog.text.count("failed; the supervisor carries on") >= 3, caplog.text
    _alive(sup, loop)
