"""Control-plane security: operator commands only for operators (--admin-group), instance names that
cannot reach a terminal or the log raw, and signals to hung instances only through pidfds.

The pure parts (the broker's check, the options, the parser, the status printer, pidfd signalling of
processes this test starts) run in the fast tier; the tests that need other uids run as root, marked
``kernel``, against the real loop over the in-memory maps and over the kernel (``control_plane``)."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from helpers.fake_kernel import FakeKernel
from helpers.procs import REPO, wait_for
from reuseport_standby import cli, client, protocol, status
from reuseport_standby.client import InstanceClient, connect, request
from reuseport_standby.errors import ProtocolError
from reuseport_standby.kernel import pidfd as kpidfd
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.supervisor import handover, peers
from reuseport_standby.supervisor.broker import Broker
from reuseport_standby.supervisor.options import SuperviseOptions
from reuseport_standby.supervisor.registry import Instance, Registry

USER = 4242 if os.geteuid() != 4242 else 4243  # neither root nor the supervisor's own user
PIDS = iter(range(2**30 + 20_000, 2**31))
ADMIN_GID = 4343  # numeric: no /etc/group entry needed
NOGROUP = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers as other uids")


def req(op: str, **fields: object) -> protocol.Request:
    return protocol.parse_request(json.dumps({"v": protocol.VERSION, "op": op, **fields}).encode())


@pytest.fixture
def broker():
    b = Broker("privs", [Address("127.0.0.1", free_port())], backlog=16, open_group=FakeKernel().open_group,
               queues=dict, stall_timeout=0)
    b.open()
    yield b
    for inst in b.registry:
        b.close_pending(inst)
    b.close()


def _active(broker: Broker, role: str) -> Instance:
    inst = broker.registry.new(None, next(PIDS), 0)
    broker.handle(inst, req("hello", role=role, pid=inst.pid), [])
    broker.handle(inst, req("ready"), [])
    return inst


# -- A. operator commands: who may ------------------------------------------------------------------------

OPERATOR_REQUESTS = [("weight", {"standby": 50}), ("promote", {}), ("drain", {"role": "primary"}),
                     ("undrain", {"role": "primary"})]


@pytest.mark.parametrize("op, fields", OPERATOR_REQUESTS)
def test_a_plain_group_member_is_refused_operator_commands(broker: Broker, op: str, fields: dict) -> None:
    primary, standby = _active(broker, "primary"), _active(broker, "standby")
    before = broker.states[broker.addresses[0]].group.read_config()
    member = broker.registry.new(None, next(PIDS), USER)  # admitted (in --group), nothing more
    with pytest.raises(ProtocolError) as refused:
        broker.handle(member, req(op, **fields), [])
    assert refused.value.code == "forbidden"
    text = str(refused.value)
    assert f"uid {USER}" in text and "--admin-group" in text and "root" in text, text
    assert "\n" not in text
    assert broker.states[broker.addresses[0]].group.read_config() == before, "nothing changed"
    assert (primary.state.value, standby.state.value, broker.swapped) == ("active", "active", False)
    # Status stays readable, and the instance requests still act on the member's own connection.
    reply, _ = broker.handle(member, req("status"), [])
    assert reply["ok"] and len(reply["status"]["instances"]) == 2
    assert broker.handle(member, req("heartbeat"), [])[0]["ok"]


def test_an_admin_group_member_and_root_may_send_operator_commands(broker: Broker) -> None:
    _active(broker, "primary")
    _active(broker, "standby")
    admin = broker.registry.new(None, next(PIDS), USER, admin=True)  # what _admit decides for --admin-group
    assert broker.handle(admin, req("weight", standby=30), [])[0]["standby_weight"] == 30
    assert broker.handle(admin, req("drain", role="primary"), [])[0]["ok"]
    root = broker.registry.new(None, next(PIDS), 0)
    own = broker.registry.new(None, next(PIDS), os.geteuid())
    assert root.admin and own.admin, "root and the supervisor's own user are operators by their uid"
    assert broker.handle(root, req("undrain", role="primary"), [])[0]["ok"]
    assert broker.handle(own, req("promote"), [])[0]["swapped"] is True


def test_operator_rights_come_from_the_credentials_recorded_at_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        pid, uid, gid = peers.peercred(a)
        assert peers.is_admin(a, pid, uid, gid, None), "our own uid"
        assert peers.is_admin(a, pid, 0, gid, None), "root"
        assert not peers.is_admin(a, pid, USER, USER, None), "no --admin-group: a group member is no operator"
        monkeypatch.setattr(peers, "peer_groups", lambda conn, pid, gid: {gid, NOGROUP})
        assert not peers.is_admin(a, pid, USER, USER, str(ADMIN_GID)), "in --group only"
        monkeypatch.setattr(peers, "peer_groups", lambda conn, pid, gid: {gid, NOGROUP, ADMIN_GID})
        assert peers.is_admin(a, pid, USER, USER, str(ADMIN_GID))


def test_admin_group_option_round_trips_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = SuperviseOptions(service="web", binds=("127.0.0.1:8000",), group="nogroup", admin_group=str(ADMIN_GID))
    assert opts.argv()[-4:] == ["--group", "nogroup", "--admin-group", str(ADMIN_GID)]
    assert SuperviseOptions.from_args(cli.build_parser().parse_args(opts.argv())) == opts
    assert SuperviseOptions(service="web", binds=("127.0.0.1:8000",)).admin_group is None
    with pytest.raises(ValueError, match="--admin-group needs --group"):
        SuperviseOptions(service="web", binds=("127.0.0.1:8000",), admin_group="wheel").check()
    with pytest.raises(ValueError, match="unknown group 'no-such-group-here' for --admin-group"):
        SuperviseOptions(service="web", binds=("127.0.0.1:8000",), group="nogroup",
                         admin_group="no-such-group-here").check()
    # `run` passes it to the supervisor it starts.
    from reuseport_standby import runner

    seen = {}
    monkeypatch.setattr(runner, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    cli.main(["run", "--service", "web", "--bind", "127.0.0.1:8000", "--group", "nogroup",
              "--admin-group", str(ADMIN_GID), "--", "gunicorn", "app:app"])
    assert seen["cfg"].supervisor.admin_group == str(ADMIN_GID)
    assert "--admin-group" in seen["cfg"].supervisor.argv()


def test_the_cli_prints_a_refusal_as_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise ProtocolError("forbidden", "'drain' is an operator command\x1b[2J\nFORGED line")

    monkeypatch.setattr(client, "admin", refuse)
    assert cli.main(["drain", "--role", "primary", "--service", "web", "--control", "/nonexistent"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "Traceback" not in err, err
    assert err.startswith("reuseport-standby: 'drain' is an operator command")


CHILD = r'''
import contextlib, io, json, os, sys
from reuseport_standby import cli, client, status
from reuseport_standby.errors import ProtocolError
service, control, groups, ops, cli_args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
os.setgroups([int(g) for g in groups.split(",")]); os.setgid(65534); os.setuid(65534)
out = {"uid": os.getuid(), "groups": sorted(os.getgroups())}
st = client.query(service, "status", control)["status"]
out["status"] = [i["state"] for i in st["instances"]]
for msg in ops:
    try:
        client.admin(service, msg, control)
        out[msg["op"]] = "ok"
    except ProtocolError as e:
        out[msg["op"]] = [e.code, str(e)]
err, std = io.StringIO(), io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
    rc = cli.main([*cli_args, "--service", service, "--control", control])
out["cli"] = [rc, err.getvalue(), std.getvalue()]
print(json.dumps(out))
'''


def _as_member(sup, groups: list[int], ops: list[dict], *cli_args: str) -> dict:
    """Requests from uid 65534 with these groups (a forked child that drops privileges after its imports:
    this interpreter lives where nobody may read)."""
    r = subprocess.run([sys.executable, "-c", CHILD, sup.service, sup.control, ",".join(map(str, groups)),
                        json.dumps(ops), *cli_args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.kernel  # needs root (other uids); runs over the in-memory maps and over the kernel
@needs_root
def test_only_operators_may_drain_promote_or_weight_over_the_control_socket(control_plane) -> None:
    sup = control_plane(extra=["--group", "nogroup", "--admin-group", str(ADMIN_GID)])
    primary = InstanceClient("primary", sup.service, control=sup.control, reconnect=False)
    standby = InstanceClient("standby", sup.service, control=sup.control, reconnect=False)
    try:
        for c in (primary, standby):
            for s in c.open():
                s.close()
            c.ready()
        ops = [{"op": "weight", "standby": 100}, {"op": "drain", "role": "primary"}, {"op": "promote"},
               {"op": "undrain", "role": "standby"}]

        plain = _as_member(sup, [NOGROUP], ops, "drain", "--role", "primary")
        assert plain["uid"] == 65534 and plain["groups"] == [NOGROUP]
        assert plain["status"] == ["active", "active"], "status is readable by a plain member"
        for msg in ops:
            code, text = plain[msg["op"]]
            assert code == "forbidden" and "--admin-group" in text, plain
        rc, err, _ = plain["cli"]
        assert rc == cli.EXIT_ERROR and err.count("\n") == 1 and "Traceback" not in err, err
        assert "'drain' is an operator command" in err and "--admin-group" in err, err
        st = sup.status()
        assert [i["state"] for i in st["instances"]] == ["active", "active"], "the primary was not drained"
        assert st["addresses"][0]["standby_weight"] == 0 and not st["addresses"][0].get("roles_swapped")
        assert "forbidden" in sup.log()

        admin = _as_member(sup, [NOGROUP, ADMIN_GID], [{"op": "weight", "standby": 10},
                                                       {"op": "drain", "role": "primary"},
                                                       {"op": "undrain", "role": "primary"}],
                           "weight", "--standby", "20")
        assert (admin["weight"], admin["drain"], admin["undrain"]) == ("ok", "ok", "ok"), admin
        assert admin["cli"][:2] == [0, ""] and admin["cli"][2] == "standby weight: 20%\n", admin
        assert sup.status()["addresses"][0]["standby_weight"] == 20

        # Root may (the test runs as root: the supervisor's own user too).
        assert client.admin(sup.service, {"op": "weight", "standby": 0}, sup.control)["standby_weight"] == 0
        assert client.admin(sup.service, {"op": "drain", "role": "primary"}, sup.control)["ok"]
        assert client.admin(sup.service, {"op": "undrain", "role": "primary"}, sup.control)["ok"]
    finally:
        primary.close()
        standby.close()


# -- B. peer strings --------------------------------------------------------------------------------------

FORGED = "x\x1b[2J\x1b[31m\n2030-01-01 00:00:00,000 reuseport_standby.supervisor INFO FORGED root logged in"


@pytest.mark.parametrize("name", ["", "gunicorn", "gunicorn worker 3", "uvicorn worker",
                                  "uvicorn app.main:app (4 workers)", "uvicorn make_app.<locals>.App",
                                  "web-1.prod@host+blue/green_a", "n" * 128])
def test_the_names_integrations_send_are_valid(name: str) -> None:
    assert req("hello", role="primary", pid=7, name=name).name == name


@pytest.mark.parametrize("name", [FORGED, "a\nb", "bell\x07", "\u202eevil", "caf\u00e9", "tab\tbed", "n" * 129, 42])
def test_a_name_outside_the_safe_charset_is_malformed(name: object) -> None:
    for op, fields in (("hello", {"role": "primary", "pid": 7}), ("readopt", {"role": "primary", "pid": 7})):
        with pytest.raises(ProtocolError) as bad:
            protocol.parse_request(json.dumps({"v": 1, "op": op, "name": name, **fields}).encode(),
                                   1 if op == "readopt" else 0)
        assert bad.value.code == "malformed"
        text = str(bad.value)
        assert "'name'" in text and ("letters, digits" in text or "at most 128" in text or "string" in text), text
        assert "\x1b" not in text and "\n" not in text and "FORGED" not in text, "the refusal never quotes the name"


def test_status_printer_escapes_what_a_peer_sent() -> None:
    """A status document from an older supervisor may carry names unchecked: the human view escapes them."""
    doc = {"service": "web", "supervisor": {"pid": 1, "uptime_s": 3, "control": "/run/x.sock"},
           "instances": [{"id": 1, "role": "primary", "pid": 10, "state": "active", "name": FORGED,
                          "slots": {"127.0.0.1:80": 0}, "queues": {"127.0.0.1:80": {"queued": 0}},
                          "demoted_for": "stalled\x1b]0;title\x07"},
                         {"id": 2, "role": "standby", "pid": 11, "state": "pending", "scope": "worker",
                          "name": "w\u202e\r\n"}],
           "addresses": []}
    out = status.render(doc)
    assert out.count("\n") == 3, out  # service, supervisor, two instances: four lines
    assert all(c.isprintable() for line in out.split("\n") for c in line), repr(out)
    assert "x\\x1b[2J\\x1b[31m\\n2030-01-01" in out and "\\u202e\\r\\n" in out and "\\x07" in out
    assert not any(line.startswith("2030") for line in out.split("\n"))
    assert status.printable("plain text: ok [1] (é)") == "plain text: ok [1] (é)"


def test_a_name_with_escape_codes_is_refused_at_hello_and_never_logged(control_plane) -> None:
    sup = control_plane()
    with connect(sup.control) as conn:
        with pytest.raises(ProtocolError) as bad:
            request(conn, {"op": "hello", "role": "primary", "pid": os.getpid(), "name": FORGED})
        assert bad.value.code == "malformed"
        # The connection stays usable, and nothing was registered.
        reply, _ = request(conn, {"op": "status"})
        assert reply["status"]["instances"] == []
    named = InstanceClient("primary", sup.service, control=sup.control, name="gunicorn worker 3", reconnect=False)
    for s in named.open():
        s.close()
    assert [i["name"] for i in sup.status()["instances"] if i["role"]] == ["gunicorn worker 3"]
    named.close()
    log = sup.log()
    assert "malformed" in log, log
    assert "\x1b" not in log and "FORGED" not in log, log
    assert not any(line.startswith("2030-01-01") for line in log.splitlines()), "a forged log line"


# -- C. signals only through pidfds --------------------------------------------------------------------------

def _reaped_pidfd() -> int:
    """A pidfd of a process that has exited and been reaped: its pid is free for anyone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    fd = os.pidfd_open(gone.pid)
    gone.wait()
    return fd


def _exited(fd: int, timeout: float) -> bool:
    """A pidfd turns readable when its process exits (works for a process that is not our child)."""
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.mark.parametrize("on_hang", ["term", "kill"])
def test_a_pid_that_now_belongs_to_another_process_is_never_signalled(on_hang: str) -> None:
    """The instance exited and was reaped; its recorded pid is now a stranger's (modelled: the pid of a live
    process of ours, with the pidfd of another, reaped one).  Today's kill(pid) hit the stranger."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fd = _reaped_pidfd()
    inst = Instance(id=1, conn=None, pid=stranger.pid, uid=os.getuid())
    inst.pidfd = fd  # taken while the instance was connected (SO_PEERPIDFD at _admit)
    try:
        handover.signal_hung(inst, on_hang)
        time.sleep(0.3)
        assert stranger.poll() is None, "the process that took over the pid was signalled"
    finally:
        os.close(fd)
        stranger.kill()
        stranger.wait()


def test_an_instance_without_a_pidfd_is_never_signalled_by_pid(caplog: pytest.LogCaptureFixture) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    inst = Instance(id=1, conn=None, pid=victim.pid, uid=os.getuid())  # as the fast tests make them: no peer
    try:
        handover.signal_hung(inst, "kill")
        time.sleep(0.3)
        assert victim.poll() is None, "no pidfd: never fall back to kill(pid)"
        assert "not signalling it" in caplog.text
    finally:
        victim.kill()
        victim.wait()
    zero = Instance(id=2, conn=None, pid=0, uid=0)
    zero.pidfd = os.pidfd_open(os.getpid())  # a peer in a PID namespace we cannot see: never, pidfd or not
    try:
        handover.signal_hung(zero, "kill")  # would kill this test
    finally:
        os.close(zero.pidfd)


FAMILY = r'''
import os, sys, time
child = os.fork()
if child == 0:
    time.sleep(60); os._exit(0)
print(child, flush=True)
time.sleep(60)
'''


@pytest.mark.parametrize("on_hang, sig", [("term", signal.SIGTERM), ("kill", signal.SIGKILL)])
def test_a_hung_instance_and_its_child_get_the_signal_through_pidfds(on_hang: str, sig: int) -> None:
    inst_proc = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    child = int(inst_proc.stdout.readline())
    child_fd = os.pidfd_open(child)
    inst = Instance(id=1, conn=None, pid=inst_proc.pid, uid=os.getuid(), pidfd=os.pidfd_open(inst_proc.pid))
    try:
        handover.signal_hung(inst, on_hang)
        assert inst_proc.wait(10) == -sig
        assert _exited(child_fd, 10), "its child was not signalled"
    finally:
        if inst_proc.poll() is None:
            inst_proc.kill()
            inst_proc.wait()
        os.kill(child, signal.SIGKILL) if not _exited(child_fd, 0) else None
        os.close(child_fd)
        os.close(inst.pidfd)


def test_a_child_that_is_no_longer_the_instances_is_not_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children are read from /proc by pid: one that has been reparented since is left alone."""
    inst_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # our child, not its
    inst = Instance(id=1, conn=None, pid=inst_proc.pid, uid=os.getuid(), pidfd=os.pidfd_open(inst_proc.pid))
    monkeypatch.setattr(handover, "children", lambda pid: [bystander.pid])  # as /proc said, a moment ago
    try:
        handover.signal_hung(inst, "kill")
        assert inst_proc.wait(10) == -signal.SIGKILL
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        for p in (inst_proc, bystander):
            if p.poll() is None:
                p.kill()
            p.wait()
        os.close(inst.pidfd)


def _fdinfo_pid_or_none(fd: int) -> int | None:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return None


def _fdinfo_pid(fd: int) -> int:
    pid = _fdinfo_pid_or_none(fd)
    assert pid is not None, f"fd {fd} is no pidfd"
    return pid


def test_the_peer_pidfd_is_taken_at_connect_and_names_the_peer() -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = f"/tmp/rs-pidfd-{uuid.uuid4().hex[:8]}.sock"
    server.bind(path)
    server.listen(4)
    peer = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                             "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
                             "sys.stdin.read()", path], stdin=subprocess.PIPE)
    try:
        conn, _ = server.accept()
        pid, _, _ = peers.peercred(conn)
        assert pid == peer.pid
        fd = peers.peer_pidfd(conn, pid)
        assert fd is not None and _fdinfo_pid(fd) == peer.pid and kpidfd.is_alive(fd)
        assert peers.peer_pidfd(conn, 0) is None, "a pid we cannot see: no pidfd, never signalled"

        # The fallback before Linux 6.5 (no SO_PEERPIDFD): pidfd_open, kept only while the peer is connected.
        class OldKernel:
            def __init__(self, sock: socket.socket) -> None:
                self.sock = sock

            def fileno(self) -> int:
                return self.sock.fileno()

            def getsockopt(self, *args: int) -> int:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")

        old = peers.peer_pidfd(OldKernel(conn), pid)  # type: ignore[arg-type]
        assert old is not None and _fdinfo_pid(old) == peer.pid
        os.close(old)
        peer.stdin.close()
        peer.wait(10)
        assert not kpidfd.is_alive(fd), "the pidfd follows the peer, not its pid"
        assert peers.peer_pidfd(OldKernel(conn), pid) is None, "a peer that hung up gets no pidfd by its pid"
        # The registry owns it from here: forgetting the peer closes it.
        registry = Registry()
        inst = registry.new(conn, pid, USER, pidfd=fd)
        assert registry.forget(inst) and inst.pidfd is None
        with pytest.raises(OSError):
            os.fstat(fd)
        conn.close()
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait()
        server.close()
        os.unlink(path)


def test_the_loop_records_rights_and_a_pidfd_at_connect(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop decides at connect; the pidfd is the peer's (taken at connect before Linux 6.5, from
    SO_PEERPIDFD when first needed after), and goes when the peer goes."""
    from reuseport_standby.supervisor.loop import Supervisor

    sup = Supervisor(SuperviseOptions(service=f"t{uuid.uuid4().hex[:10]}", binds=(f"127.0.0.1:{free_port()}",),
                                      control=str(short_tmp / "c.sock"), pin_root=str(short_tmp / "pins")),
                     open_group=FakeKernel().open_group, queues=dict)
    sup.start()
    try:
        for kernel_has_it in (True, False):
            monkeypatch.setattr(peers, "_has_peerpidfd", kernel_has_it)
            conn = connect(sup.control_path)
            wait_for(lambda: sup.step(0.05) or sup.instances, 5, what="the connection to be admitted")
            (inst,) = sup.instances
            assert inst.admin, "our own uid"
            assert (inst.pidfd is None) is kernel_has_it, "an idle connection holds one fd where it can"
            fd = handover.instance_pidfd(inst)
            assert fd is not None and inst.pidfd == fd and _fdinfo_pid(fd) == os.getpid()
            conn.close()
            wait_for(lambda: sup.step(0.05) or not sup.instances, 5, what="the peer to be forgotten")
            assert inst.pidfd is None, "closed when the peer was forgotten"
            assert not os.path.exists(f"/proc/self/fdinfo/{fd}") or _fdinfo_pid_or_none(fd) != os.getpid()
    finally:
        sup.close()


def test_no_pidfd_is_ever_opened_later_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SO_PEERPIDFD, what was not taken at connect is not made up later from the pid."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(peers, "_has_peerpidfd", False)
    with a, b:
        inst = Instance(id=1, conn=a, pid=os.getpid(), uid=os.getuid())
        assert handover.instance_pidfd(inst) is None
