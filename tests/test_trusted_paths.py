"""One supervisor per service, and only trusted paths: the pins, the bpffs mount, the control socket.

A second ``supervise`` of a running service used to replace the pinned program and empty the parking
slot before it failed at the control socket; a pin root or service directory that another user made
(or linked elsewhere) was chowned and chmodded through; ``--mount-bpffs`` mounted bpffs 1777; and a
link swapped in for the control socket was chmodded and chowned through (docs/security.md, "Paths",
"One supervisor per service").
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REQUIRE_KERNEL, TEST_PIN_BASE, free_port, remove_pins
from helpers.fake_kernel import FakeKernel
from helpers.netutil import collect, open_clients, serve
from helpers.procs import REPO, SupervisorProc, wait_for
from reuseport_standby import client, protocol
from reuseport_standby.errors import ReuseportStandbyError, SupervisorUnavailable
from reuseport_standby.supervisor import SuperviseOptions, Supervisor
from reuseport_standby.supervisor.peers import give_to_group

NOBODY = 65534


def _supervise(options: SuperviseOptions, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``supervise``; one that starts serving after all (it should have refused) is stopped as soon as
    it answers, so the test can show what it changed."""
    cmd = options.command()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def serving() -> bool:
        try:
            st = client.query(options.service, "status", options.control_path, timeout=0.5)["status"]
        except (SupervisorUnavailable, OSError):
            return False
        return st["supervisor"]["pid"] == proc.pid

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not serving():
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    out, err = proc.communicate(timeout=15)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    """A startup refusal: exit 1, one line on stderr (after any log lines), no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("reuseport-standby: ")]
    return line


# -- one supervisor per service ----------------------------------------------------------------------

def _pins(pin_dir: Path) -> dict:
    from reuseport_standby.kernel.group import Group

    with Group.adopt(pin_dir) as g:
        return {"files": sorted(p.name for p in pin_dir.iterdir()), "prog_id": g.prog_info.id,
                "slots": g.slots(), "config": g.read_config()}


def test_a_second_supervisor_changes_nothing_and_says_so(supervisor) -> None:
    """Even with --no-migrate (which would replace prog_migrate by prog_select) and the same control
    socket: refused before it touches anything; queues still migrate afterwards."""
    from reuseport_standby import status
    from reuseport_standby.kernel.layout import PARKING_SLOT

    sup = supervisor()
    pin_dir = Path(sup.pin_root) / sup.service / _group_name(sup.binds[0])
    standby = client.InstanceClient("standby", sup.service, control=sup.control, reconnect=False)
    primary = client.InstanceClient("primary", sup.service, control=sup.control, reconnect=False)
    (s_lsn,) = standby.open()
    standby.ready()
    (p_lsn,) = primary.open()
    primary.ready()
    before = _pins(pin_dir)
    assert "prog_migrate" in before["files"] and PARKING_SLOT in before["slots"]

    second = SuperviseOptions(service=sup.service, binds=tuple(sup.binds), control=sup.control,
                              pin_root=str(sup.pin_root), migrate=False)
    r = _supervise(second)
    assert _pins(pin_dir) == before, "program pin, program id, slots (parking cookie) and config unchanged"
    line = _one_line_error(r)
    assert f"service {sup.service} already has a supervisor (pid {sup.proc.pid}; its control socket: " \
           f"{sup.control}" in line and "stop it first, or use another --service" in line, line
    # With a control path of its own, it changes nothing either (it used to start, and take over the port).
    other = SuperviseOptions(service=sup.service, binds=tuple(sup.binds), control=sup.control + ".2",
                             pin_root=str(sup.pin_root), migrate=False)
    r = _supervise(other)
    assert _pins(pin_dir) == before
    assert "already has a supervisor" in _one_line_error(r)
    assert not os.path.exists(other.control_path)
    assert client.query(sup.service, "ping", sup.control, timeout=2)["ok"], "the first one still serves"
    offline = status.offline(sup.service, str(sup.pin_root), reason="test")  # readers take no lock
    assert offline["addresses"][0]["prog_id"] == before["prog_id"]

    # Queue migration still works: connections queued on the primary reach the standby when it closes.
    host, _, port = sup.binds[0].rpartition(":")
    clients = open_clients((host, int(port)), 10)
    wait_for(lambda: _queued(sup, "primary") == 10, 5, what="10 connections queued on the primary")
    primary.close()
    p_lsn.close()
    assert serve(s_lsn, limit=10, timeout=5) == 10
    out = collect(clients)
    assert out.answered == 10 and out.lost == 0, out.failures
    s_lsn.close()
    standby.close()


def _group_name(bind: str) -> str:
    from reuseport_standby.kernel.sockets import Address

    return Address.parse(bind).group_name


def _queued(sup: SupervisorProc, role: str) -> int:
    return sum(q["queued"] or 0 for i in sup.status()["instances"] if i["role"] == role for q in i["queues"].values())


def test_the_lock_is_held_for_the_supervisors_life_also_over_in_memory_maps(control_plane, short_tmp: Path) -> None:
    """The lock is taken in start() whatever the maps: a second start is refused while the first runs,
    and succeeds once it is gone, even by SIGKILL (the kernel lets go of the lock)."""
    sup = control_plane()

    def second() -> Supervisor:
        return Supervisor(SuperviseOptions(service=sup.service, binds=(f"127.0.0.1:{free_port()}",),
                                           control=str(short_tmp / "second.sock"), pin_root=str(sup.pin_root)),
                          open_group=FakeKernel().open_group, queues=dict)

    with pytest.raises(ReuseportStandbyError, match=f"service {sup.service} already has a supervisor"):
        second().start()
    assert not (short_tmp / "second.sock").exists()
    assert client.query(sup.service, "ping", sup.control, timeout=2)["ok"]
    sup.kill()
    s = second()
    s.start()  # the kernel released the SIGKILLed supervisor's lock
    try:
        with pytest.raises(ReuseportStandbyError, match="already has a supervisor"):
            second().start()
    finally:
        s.close()
    s = second()
    s.start()  # close() released it
    s.close()


# -- trusted pin paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("pin_root_owner", [NOBODY, 0], ids=["pin-root-of-nobody", "pin-root-of-root"])
def test_a_linked_service_dir_is_refused_and_nothing_is_changed_through_it(pin_root: Path, short_tmp: Path,
                                                                            pin_root_owner: int) -> None:
    """A pin root pre-created by nobody (bpffs is often mounted 1777) with the service dir a link to a
    directory of root's: the supervisor (with --group, which chowns and chmods the pins) refuses, and the
    link's target keeps its owner, group, mode and contents."""
    group = grp.getgrgid(NOBODY).gr_name
    pin_root.mkdir(parents=True, mode=0o755)
    os.chown(pin_root, pin_root_owner, pin_root_owner)
    victim = TEST_PIN_BASE / f"victim-{uuid.uuid4().hex[:8]}"
    victim.mkdir(mode=0o700)
    service = f"t{uuid.uuid4().hex[:10]}"
    link = pin_root / service
    os.symlink(victim, link)
    try:
        options = SuperviseOptions(service=service, binds=(f"127.0.0.1:{free_port()}",),
                                   control=str(short_tmp / f"{service}.sock"), pin_root=str(pin_root),
                                   group=group)
        r = _supervise(options)
        st = os.stat(victim)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700), "nothing done through the link"
        assert os.listdir(victim) == [], "nothing pinned through the link"
        line = _one_line_error(r)
        if pin_root_owner == NOBODY:
            assert f"refusing the pin directory {pin_root}: it is owned by uid {NOBODY}" in line, line
        else:
            assert f"refusing the pin directory {link}: it is a symbolic link" in line, line
        assert "remove it" in line
        st = os.lstat(pin_root)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pin_root_owner, pin_root_owner, 0o755)
        assert not Path(options.control_path).exists()
    finally:
        os.unlink(link)
        remove_pins(victim)


def test_a_pin_directory_writable_by_others_is_refused(pin_root: Path, short_tmp: Path) -> None:
    pin_root.mkdir(parents=True)
    os.chmod(pin_root, 0o777)
    options = SuperviseOptions(service=f"t{uuid.uuid4().hex[:10]}", binds=(f"127.0.0.1:{free_port()}",),
                               control=str(short_tmp / "w.sock"), pin_root=str(pin_root))
    r = _supervise(options)
    assert os.listdir(pin_root) == []
    line = _one_line_error(r)
    assert f"refusing the pin directory {pin_root}: it is writable by group and others (mode 0777)" in line, line


def test_mount_bpffs_mounts_it_for_root_alone(kernel: None, short_tmp: Path) -> None:
    """--mount-bpffs on a fresh bpffs, in a private mount namespace (the host's /sys/fs/bpf is untouched):
    mounted 0700 (the kernel adds the sticky bit), not the kernel's default 1777."""
    unshare = shutil.which("unshare")
    if unshare is None:
        (pytest.fail if REQUIRE_KERNEL else pytest.skip)("needs unshare (util-linux)")
    host_before = os.stat("/sys/fs/bpf")
    script = f"""
import json, os, subprocess, sys
from reuseport_standby.kernel.pins import BPFFS_MAGIC, _statfs_type
for _ in range(5):  # in this namespace only; whatever was mounted there (maybe more than once)
    if _statfs_type("/sys/fs/bpf") != BPFFS_MAGIC:
        break
    subprocess.run(["umount", "/sys/fs/bpf"], check=True)
assert _statfs_type("/sys/fs/bpf") != BPFFS_MAGIC, "could not unmount bpffs in the namespace"
from reuseport_standby.supervisor import SuperviseOptions, Supervisor
sup = Supervisor(SuperviseOptions(service="mnt", binds=("127.0.0.1:{free_port()}",),
                                  control="{short_tmp}/mnt.sock", mount_bpffs=True))
sup.start()
try:
    out = {{p: [os.stat(p).st_mode, os.stat(p).st_uid] for p in
           ("/sys/fs/bpf", "/sys/fs/bpf/reuseport_standby", "/sys/fs/bpf/reuseport_standby/mnt")}}
    out["fs"] = _statfs_type("/sys/fs/bpf") == BPFFS_MAGIC
finally:
    sup.close()
print(json.dumps(out))
"""
    r = subprocess.run([unshare, "--mount", "--propagation", "private", sys.executable, "-c", script], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["fs"], "bpffs was mounted"
    mode, uid = out["/sys/fs/bpf"]
    assert uid == 0 and stat.S_IMODE(mode) & 0o777 == 0o700, f"{stat.S_IMODE(mode):04o}"
    for p in ("/sys/fs/bpf/reuseport_standby", "/sys/fs/bpf/reuseport_standby/mnt"):
        mode, uid = out[p]
        assert uid == 0 and not stat.S_IMODE(mode) & 0o022, (p, f"{stat.S_IMODE(mode):04o}")
    host_after = os.stat("/sys/fs/bpf")
    assert (host_after.st_dev, host_after.st_mode) == (host_before.st_dev, host_before.st_mode), "host untouched"


# -- the control socket ------------------------------------------------------------------------------

@pytest.fixture
def secret(short_tmp: Path) -> Path:
    """A file only its owner (root, when run as root) and its group may read: what a link would point at."""
    f = short_tmp / "secret"
    f.write_text("not for the group\n")
    os.chmod(f, 0o640)
    return f


def _unchanged(f: Path, before: os.stat_result) -> None:
    after = os.stat(f)
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == \
           (before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode)), "changed through the link"


def test_a_link_swapped_in_for_the_control_socket_is_not_followed(short_tmp: Path, secret: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who could write the socket's directory replaces the fresh socket by a link to a 0640 file
    right after bind (the race, made certain): the file's mode stays as it was, the socket is refused."""
    path = str(short_tmp / "c.sock")
    before = os.stat(secret)

    class Swapped(socket.socket):
        def bind(self, address) -> None:  # type: ignore[override]
            super().bind(address)
            if address == path:
                os.unlink(path)
                os.symlink(secret, path)

    monkeypatch.setattr(socket, "socket", Swapped)
    with pytest.raises(ReuseportStandbyError, match="was replaced right after it was bound"):
        protocol.listen_unix(path, "supervisor").close()
    _unchanged(secret, before)


@pytest.mark.kernel  # needs root: chown to a group we are not in
def test_give_to_group_never_follows_a_link(short_tmp: Path, secret: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_CHOWN)")
    os.chown(secret, 0, 0)
    before = os.stat(secret)
    link = short_tmp / "c.sock"
    os.symlink(secret, link)
    with pytest.raises(ReuseportStandbyError, match="is no longer the socket this supervisor bound"):
        give_to_group(link, NOBODY, "nogroup")
    _unchanged(secret, before)
    # The socket itself is handed over.
    path = str(short_tmp / "real.sock")
    with protocol.listen_unix(path, "supervisor"):
        give_to_group(path, NOBODY, "nogroup")
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_gid == NOBODY and stat.S_IMODE(st.st_mode) == 0o660


@pytest.mark.parametrize("kind", ["link", "file"])
def test_what_is_not_a_socket_at_the_control_path_is_left_alone(short_tmp: Path, secret: Path, kind: str) -> None:
    path = short_tmp / "c.sock"
    if kind == "link":
        os.symlink(secret, path)
    else:
        path.write_text("someone's file\n")
    before = os.stat(secret)
    with pytest.raises(ReuseportStandbyError, match="exists and is (a symbolic link|not a socket): not touched"):
        protocol.listen_unix(str(path), "supervisor")
    assert os.path.lexists(path) and (path.is_symlink() if kind == "link" else path.read_text() == "someone's file\n")
    _unchanged(secret, before)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_control_directory_others_may_write_is_refused(short_tmp: Path, mode: int) -> None:
    d = short_tmp / "open"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(ReuseportStandbyError, match=f"refusing to listen at {d}/c.sock: its directory {d} is "
                                                    f"writable by .* \\(mode {mode:04o}\\)"):
        protocol.listen_unix(str(d / "c.sock"), "supervisor")
    assert not (d / "c.sock").exists()


@pytest.mark.kernel  # needs root: chown
def test_a_control_directory_of_another_user_is_refused(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    d = short_tmp / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ReuseportStandbyError, match=f"its directory {d} belongs to uid {NOBODY}"):
        protocol.listen_unix(str(d / "c.sock"), "supervisor")


def test_control_directories_that_are_fine(short_tmp: Path) -> None:
    """A directory we create is 0755 whatever the umask (0077 under systemd), the socket 0660; a sticky
    directory such as /tmp is fine (nobody can rename our socket there); a stale socket is replaced."""
    old = os.umask(0o077)
    try:
        made = short_tmp / "run" / "reuseport-standby"
        server = protocol.listen_unix(str(made / "svc.sock"), "supervisor")
    finally:
        os.umask(old)
    server.close()
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o755
    st = os.lstat(made / "svc.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    # The socket left behind (nobody listens on it) is stale: replaced.
    protocol.listen_unix(str(made / "svc.sock"), "supervisor").close()
    sticky = short_tmp / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    protocol.listen_unix(str(sticky / "svc.sock"), "supervisor").close()
