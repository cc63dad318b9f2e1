"""`reuseport-standby run`, `reload` and `demo` as a user runs them: real processes, real load."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port
from helpers.procs import REPO, wait_for
from helpers.proctree import descendants, proc_status
from helpers.venvs import NOBODY, NOGROUP
from reuseport_standby import client
from reuseport_standby.errors import ProtocolError
from reuseport_standby.loadgen import Load
from reuseport_standby.run_client import request_reload
from helpers.runs import APPS, Run, _cmdline

GUNICORN = ["gunicorn", "-w", "2", "--graceful-timeout", "5", "versioned_app:app"]
UVICORN = ["uvicorn", "--workers", "2", "--timeout-graceful-shutdown", "5", "versioned_app:asgi_app"]


@pytest.mark.parametrize("cmd", [GUNICORN, UVICORN], ids=["gunicorn", "uvicorn"])
def test_rolling_reloads_under_load_lose_nothing(short_tmp: Path, pin_root: Path, nobody_venv: Path,
                                                 cmd: list[str]) -> None:
    run = Run(short_tmp, pin_root, cmd, user="nobody", venv=nobody_venv)
    try:
        before = run.wait_both()
        pids = [before]
        with Load("127.0.0.1", run.port, concurrency=8, duration=300) as load:
            for _ in range(5):
                result = request_reload(run.service, run.control, timeout=120)
                assert [r["role"] for r in result["replaced"]] == ["standby", "primary"]
                pids.append(run.wait_both())
            load.stop()
        r = load.result
        print(f"\n{cmd[0]}: 5 rolling reloads: {r.summary()}")
        assert r.failed == 0, r.failures
        assert r.ok > 500
        assert r.max_latency < 1.0, "a SYN was retransmitted"
        assert len({p["primary"] for p in pids}) == 6 and len({p["standby"] for p in pids}) == 6
    finally:
        run.stop_and_check_nothing_left()


def test_broken_new_version_is_rolled_back(short_tmp: Path, pin_root: Path, nobody_venv: Path) -> None:
    flag = short_tmp / "broken"
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_BROKEN_FLAG": str(flag)}, user="nobody", venv=nobody_venv)
    try:
        before = run.wait_both()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120) as load:
            flag.touch()
            with pytest.raises(ProtocolError) as err:
                request_reload(run.service, run.control, timeout=120)
            assert err.value.code == "rolled_back" and "exited with status" in str(err.value)
            # The rollback leaves the old instances alone.  (Once, in CI, the old standby was not active
            # right after the failed reload; it was not seen again: allow a transient state such as a
            # heartbeat demotion under load, and print what it was, but never a retired standby.)
            if run.active() != before:
                print(f"\nright after the rollback: {run.instances()}\n{run.log()[-4000:]}")
            wait_for(lambda: run.active() == before, 10, 0.1,
                     what=f"the old instances to keep serving: {run.instances()}\n{run.log()[-4000:]}")
            flag.unlink()
            request_reload(run.service, run.control, timeout=120)
            after = run.wait_both()
            load.stop()
        assert after["primary"] != before["primary"]
        assert load.result.failed == 0, load.result.failures
    finally:
        run.stop()


def test_killing_runs_children_one_by_one_loses_nothing(short_tmp: Path, pin_root: Path, nobody_venv: Path) -> None:
    run = Run(short_tmp, pin_root, GUNICORN, user="nobody", venv=nobody_venv)
    try:
        run.wait_both()
        sup_pid = int(subprocess.check_output(["pgrep", "-f", f"supervise --service {run.service}"]).split()[0])
        with Load("127.0.0.1", run.port, concurrency=8, duration=120) as load:
            os.kill(sup_pid, signal.SIGKILL)
            wait_for(lambda: run.active() and len(run.instances()) == 2, 30, 0.1, what="supervisor back")
            for role in ("primary", "standby", "primary"):
                os.kill(run.active()[role], signal.SIGKILL)
                time.sleep(0.3)
                run.wait_both()
            time.sleep(0.5)
            load.stop()
        print(f"\nkilled supervisor, primary, standby, primary: {load.result.summary()}")
        assert load.result.failed == 0, load.result.failures
    finally:
        run.stop_and_check_nothing_left()
    assert "restarting it" in run.log()


def test_crash_loop_is_reported(short_tmp: Path, pin_root: Path, nobody_venv: Path) -> None:
    flag = short_tmp / "broken"
    flag.touch()
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_BROKEN_FLAG": str(flag)}, user="nobody", venv=nobody_venv)
    try:
        wait_for(lambda: "crash-looping" in run.log(), 60, 0.2, what="crash loop report")
        flag.unlink()
        run.wait_both(timeout=90)  # recovers once the app imports again
    finally:
        run.stop()


def test_sigterm_stops_everything(short_tmp: Path, pin_root: Path) -> None:
    """As root without --user (allowed, loudly): SIGTERM stops everything, even a process that left its
    instance's process group and session (the app daemonized a helper)."""
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_SPAWN_DETACHED": "1"})
    run.wait_both()
    pids = list(run.active().values())
    detached = wait_for(lambda: {p for p in run.leftovers() if _cmdline(p).startswith("sleep ")}, 20,
                        what="the app's detached helpers")
    assert all(os.getsid(p) == p for p in detached), "each helper has a session of its own"
    run.stop_and_check_nothing_left()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not Path(run.control).exists()
    assert "running without --user" in run.log(), "root instances are not started silently"


def test_demo_exits_0_and_draws(tmp_path: Path, kernel: None) -> None:
    png = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "demo", "--duration", "8", "--out", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOTHING FAILED" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_baseline_shows_failures(tmp_path: Path, kernel: None) -> None:
    png = tmp_path / "baseline.png"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "demo", "--baseline", "--duration", "8", "--out", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REQUESTS FAILED" in r.stdout
    assert png.exists()


def test_demo_bad_version_is_rolled_back_on_the_timeline(tmp_path: Path, kernel: None) -> None:
    png = tmp_path / "canary.png"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "demo", "--bad-version", "--duration", "15",
                        "--out", str(png)], cwd=REPO, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "THE BAD VERSION WAS ROLLED BACK BY ITSELF; NO CONNECTION FAILED" in r.stdout
    v2 = next(line for line in r.stdout.splitlines() if line.strip().startswith("v2 (bad"))
    assert "rolled back" in v2 and int(v2.split("answered,")[1].split()[0]) > 0, "its errors are shown"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_users_own_gunicorn_config_keeps_working(short_tmp: Path, pin_root: Path, nobody_venv: Path) -> None:
    """`run --user nobody -- gunicorn -c their.conf.py ...`: their settings and hooks apply, ours are composed
    in (the composed config, written by root, is handed to the instances' user)."""
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = shared / "hook-ran"
    conf = short_tmp / "their.conf.py"
    conf.write_text(
        "import pathlib\n"
        "workers = 3\n"
        "bind = '0.0.0.0:1'  # ignored under run: the supervisor owns the addresses\n"
        f"def post_worker_init(worker):\n    with open({str(marker)!r}, 'a') as f:\n        f.write(f'{{worker.pid}}\\n')\n"
    )
    run = Run(short_tmp, pin_root, ["gunicorn", "-c", str(conf), "versioned_app:app"], user="nobody", venv=nobody_venv)
    try:
        pids = run.wait_both()
        assert len(marker.read_text().split()) >= 1, "their post_worker_init ran in the workers"
        # The instance is ready when its first worker is; gunicorn forks the rest without waiting.
        def children() -> list[bytes]:
            r = subprocess.run(["pgrep", "-P", str(pids["primary"])], capture_output=True)
            return r.stdout.split()
        wait_for(lambda: len(children()) >= 3, timeout=30, what="3 gunicorn workers")
        assert len(children()) == 3, "their workers = 3 applies, not ours"
        with Load("127.0.0.1", run.port, concurrency=4, duration=120) as load:
            request_reload(run.service, run.control, timeout=120)
            run.wait_both()
            load.stop()
        assert load.result.failed == 0 and load.result.ok > 0
    finally:
        run.stop_and_check_nothing_left()


# -- issue 16: run in production ------------------------------------------------------------------------

def _caps(pid: int) -> dict[str, int]:
    st = proc_status(pid)
    return {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapInh")}


def test_instances_and_their_workers_run_as_the_user_without_capabilities(short_tmp: Path, pin_root: Path,
                                                                         nobody_venv: Path) -> None:
    run = Run(short_tmp, pin_root, GUNICORN, user="nobody", venv=nobody_venv)
    try:
        pids = run.wait_both()
        sup = [i for i in client.query(run.service, "status", run.control)["status"]["instances"]]
        assert {i["uid"] for i in sup} == {NOBODY}, "the supervisor sees the instances as nobody"
        sup_pid = client.query(run.service, "status", run.control)["status"]["supervisor"]["pid"]
        assert proc_status(sup_pid)["Uid"].split()[0] == "0", "the supervisor stays root"
        for master in pids.values():
            workers = wait_for(lambda: [p for p in descendants(master)], 20, what="gunicorn workers")
            for pid in (master, *workers):
                st = proc_status(pid)
                assert st["Uid"].split() == [str(NOBODY)] * 4, (pid, st["Uid"])
                assert st["Gid"].split() == [str(NOGROUP)] * 4, (pid, st["Gid"])
                assert st["Groups"] == "", (pid, st["Groups"])  # nogroup is the socket's group: no other
                assert _caps(pid) == {"CapEff": 0, "CapPrm": 0, "CapAmb": 0, "CapInh": 0}, (pid, _caps(pid))
        assert Path(run.control).stat().st_gid == NOGROUP, "the supervisor's --group is the instances' group"
        assert "running without --user" not in run.log()
    finally:
        run.stop_and_check_nothing_left()


def test_reload_racing_a_crash_of_the_old_standby_leaves_one_standby_and_nothing_behind(
        short_tmp: Path, pin_root: Path, nobody_venv: Path) -> None:
    """The race of issue 16: an app that takes 2 s to start; the old standby SIGKILLed 0.3 s into the
    reload.  The reload owns the standby's slot: no crash restart of its own, one standby registered
    throughout, and after SIGTERM nothing the run started is left."""
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_SLOW_START": "2"}, user="nobody", venv=nobody_venv)
    try:
        before = run.wait_both()
        outcome: list[object] = []
        reloader = threading.Thread(target=lambda: outcome.append(_reload_outcome(run)), daemon=True)
        reloader.start()
        time.sleep(0.3)
        os.kill(before["standby"], signal.SIGKILL)
        reloader.join(90)
        assert outcome and isinstance(outcome[0], dict), (outcome, run.log()[-3000:])
        after = run.wait_both()
        most_standbys = 0
        for _ in range(40):  # 4 s more: a stray restart (2 s to start) would have registered by now
            standbys = [i for i in run.instances() if i["role"] == "standby" and i["state"] != "draining"]
            most_standbys = max(most_standbys, len(standbys))
            time.sleep(0.1)
        print(f"\nreload with the old standby killed 0.3 s in: {outcome[0]}; before {before}, after {after}")
        assert most_standbys <= 1, f"{most_standbys} standbys registered at once\n{run.log()[-3000:]}"
        assert [i["pid"] for i in run.instances() if i["role"] == "standby"] == [after["standby"]]
        assert after["standby"] != before["standby"] and after["primary"] != before["primary"]
        # Every gunicorn master alive descends from run: none was lost track of.
        masters = {p for p in run.leftovers() if "gunicorn" in _cmdline(p) and os.getsid(p) == p}
        assert masters == {after["primary"], after["standby"]}, (masters, after)
    finally:
        run.stop_and_check_nothing_left()


def _reload_outcome(run: Run) -> object:
    try:
        return request_reload(run.service, run.control, timeout=90)
    except Exception as exc:  # the test asserts on it
        return exc


def _serving(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_supervisor_restart_failures_are_retried_while_traffic_flows(short_tmp: Path, pin_root: Path,
                                                                     nobody_venv: Path) -> None:
    """A regular file put in the control socket's place: the supervisor stops answering (3 missed pings),
    is killed, and its restarts fail (it refuses to replace a file) with a growing backoff, each failure
    logged and shown by `status`; requests keep succeeding; once the file is gone it comes back."""
    run = Run(short_tmp, pin_root, GUNICORN, user="nobody", venv=nobody_venv)
    try:
        run.wait_both()
        old_sup = client.query(run.service, "status", run.control)["status"]["supervisor"]["pid"]
        with Load("127.0.0.1", run.port, concurrency=4, duration=120) as load:
            t0 = time.monotonic()
            os.unlink(run.control)
            Path(run.control).write_text("in the way\n")
            wait_for(lambda: run.log().count("restarting it") >= 3, 40, 0.2, what=f"3 failed restarts\n{run.log()[-2000:]}")
            t_failing = time.monotonic() - t0
            assert not Path(f"/proc/{old_sup}").exists(), "the unreachable supervisor was killed"
            st = subprocess.run([sys.executable, "-m", "reuseport_standby", "status", "--service", run.service,
                                 "--control", run.control, "--pin-root", str(run.pin_dir.parent)],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
            assert st.returncode == 3 and "run pid" in st.stdout and "restart" in st.stdout, st.stdout + st.stderr
            time.sleep(2)
            assert run.proc.poll() is None and _serving(run.port), "run and the instances carry on"
            Path(run.control).unlink()
            t1 = time.monotonic()
            wait_for(lambda: len(run.instances()) == 2, 60, 0.2, what=f"the supervisor back\n{run.log()[-2000:]}")
            t_back = time.monotonic() - t1
            time.sleep(0.5)
            load.stop()
        delays = [float(d) for d in re.findall(r"restarting it in ([0-9.]+) s", run.log())]
        print(f"\nfailing restarts seen after {t_failing:.1f} s, delays {delays}; back {t_back:.1f} s after the "
              f"obstacle went; status said:\n{st.stdout}\nload: {load.result.summary()}")
        assert delays[:4] == [0.0, 0.5, 1.0, 2.0][:len(delays[:4])], delays
        assert load.result.failed == 0, load.result.failures
        assert load.result.ok > 100
        run.wait_both()
    finally:
        run.stop_and_check_nothing_left()


def test_deleted_control_socket_is_noticed_and_the_supervisor_restarted(short_tmp: Path, pin_root: Path,
                                                                       nobody_venv: Path) -> None:
    run = Run(short_tmp, pin_root, GUNICORN, user="nobody", venv=nobody_venv)
    try:
        before = run.wait_both()
        old_sup = client.query(run.service, "status", run.control)["status"]["supervisor"]["pid"]
        t0 = time.monotonic()
        os.unlink(run.control)
        wait_for(lambda: Path(run.control).exists() and run.instances(), 30, 0.1,
                 what=f"a new supervisor on the socket\n{run.log()[-2000:]}")
        noticed = time.monotonic() - t0
        new_sup = client.query(run.service, "status", run.control)["status"]["supervisor"]["pid"]
        assert new_sup != old_sup and not Path(f"/proc/{old_sup}").exists()
        os.kill(before["standby"], signal.SIGKILL)  # the restarted instance must reach the new supervisor
        wait_for(lambda: before["standby"] not in run.active().values(), 10, 0.05, what="the kill to be seen")
        after = run.wait_both(timeout=60)
        print(f"\ncontrol socket deleted: a new supervisor answered after {noticed:.1f} s")
        assert after["standby"] != before["standby"]
        assert noticed < 15, noticed
    finally:
        run.stop_and_check_nothing_left()


SPY = '''\
import os, sys
if "supervise" in sys.orig_argv:
    with open(os.environ["RS_TEST_SPY_LOG"], "a") as f:
        f.write(" ".join(sys.orig_argv) + "\\n")
'''


@pytest.mark.parametrize("args,cmd,said", [
    ([], ["python", "app.py"], "don't know how to run 'python'"),
    (["--user", "no-such-user-rs"], GUNICORN, "unknown user"),
    (["--user", "nobody", "--group", "no-such-group-rs"], GUNICORN, "unknown group"),
    ([], ["gunicorn", "-c", "/nonexistent/gunicorn.conf.py", "app:app"], "not found"),
    ([], [], "give the server command"),
], ids=["unknown-server", "bad-user", "bad-group", "missing-config", "no-command"])
@pytest.mark.kernel
def test_bad_command_lines_are_refused_before_anything_starts(short_tmp: Path, args: list[str], cmd: list[str],
                                                              said: str) -> None:
    """One line, exit status 2, and no supervisor ever started: every Python process started with this
    PYTHONPATH writes its command line to a log if it is a `supervise` (sitecustomize), and none did."""
    spy = short_tmp / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    log = short_tmp / "spy.log"
    pins = short_tmp / "pins"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "run", "--service", "refused", "--bind",
                        f"127.0.0.1:{free_port()}", "--control", str(short_tmp / "c.sock"), "--pin-root", str(pins),
                        *args, "--", *cmd], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": f"{spy}:{APPS}", "RS_TEST_SPY_LOG": str(log)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not log.exists(), f"a supervisor was started: {log.read_text()}"
    assert not pins.exists() and not (short_tmp / "c.sock").exists()


def test_spy_sees_a_supervisor(short_tmp: Path) -> None:
    """The spy of the test above works: it logs a `supervise` started with its PYTHONPATH."""
    spy = short_tmp / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    log = short_tmp / "spy.log"
    subprocess.run([sys.executable, "-m", "reuseport_standby", "supervise", "--help"], cwd=REPO, capture_output=True,
                   timeout=60, env={**os.environ, "PYTHONPATH": str(spy), "RS_TEST_SPY_LOG": str(log)})
    assert "supervise --help" in log.read_text()


def _notifications(sock: socket.socket, timeout: float) -> list[tuple[int, str]]:
    """(sender pid, message) of every datagram that arrives within ``timeout``."""
    out = []
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            continue
        pid = next((struct.unpack("3i", d)[0] for lvl, typ, d in anc
                    if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
        out.append((pid, data.decode()))
    return out


def test_type_notify_ready_comes_from_run_once_both_instances_serve(short_tmp: Path, pin_root: Path,
                                                                   nobody_venv: Path) -> None:
    """Under Type=notify only run speaks to systemd (not the supervisor, not gunicorn's arbiter): READY=1
    once the primary and the standby are both active, STOPPING=1 at SIGTERM."""
    path = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        path.chmod(0o777)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        run = Run(short_tmp, pin_root, GUNICORN, env={"NOTIFY_SOCKET": str(path)}, user="nobody", venv=nobody_venv)
        try:
            got: list[tuple[int, str]] = []
            for _ in range(60):
                got += _notifications(sock, 1.0)
                if any("READY=1" in m for _, m in got):
                    break
            active = run.active()
            assert any("READY=1" in m for _, m in got), (got, run.log()[-2000:])
            assert set(active) == {"primary", "standby"}, "READY=1 before both instances served"
            got += _notifications(sock, 3.0)  # late ones from a supervisor or a gunicorn would come now
        finally:
            run.stop_and_check_nothing_left()
        got += _notifications(sock, 0.5)
    print(f"\nnotifications: {got}")
    assert {pid for pid, _ in got} == {run.proc.pid}, got
    assert [m.split("\n")[0] for _, m in got] == ["READY=1", "STOPPING=1"], got


def _generation(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"REUSEPORT_STANDBY_GENERATION=")), None)


def test_what_a_dead_instance_leaves_behind_is_adopted_and_stopped(short_tmp: Path, pin_root: Path,
                                                                   nobody_venv: Path) -> None:
    """The app daemonizes a helper into a session of its own (out of reach of its master's process
    group).  When that instance's master is SIGKILLed, its helpers are reparented to run (a child
    subreaper), which stops them; the other instance's helpers, whose instance runs, are left alone."""
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_SPAWN_DETACHED": "1"}, user="nobody", venv=nobody_venv)
    try:
        pids = run.wait_both()

        def helpers() -> dict[str, set[int]]:
            by_gen: dict[str, set[int]] = {}
            for p in run.leftovers():
                if _cmdline(p).startswith("sleep "):
                    by_gen.setdefault(_generation(p) or "?", set()).add(p)
            return by_gen

        gen = {role: _generation(pid) for role, pid in pids.items()}
        found = wait_for(lambda: (h := helpers()) and all(len(h.get(g, ())) >= 2 for g in gen.values()) and h,
                         30, 0.2, what="two helpers of each instance")
        os.kill(pids["primary"], signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in found[gen["primary"]]), 15, 0.1,
                 what=f"the dead primary's helpers stopped\n{run.log()[-2000:]}")
        print(f"\nthe dead primary's {len(found[gen['primary']])} helpers were stopped "
              f"{time.monotonic() - t0:.1f} s after its master was killed")
        assert all(Path(f"/proc/{p}").exists() for p in found[gen["standby"]]), "the live standby's helpers stay"
        assert "outlived its instance" in run.log()
        run.wait_both()
    finally:
        run.stop_and_check_nothing_left()


def test_a_process_group_is_signalled_only_while_its_leader_is_unreaped() -> None:
    """After the master is reaped its pid (the group's id) may name another process's group:
    _kill_group does nothing then; before, it reaches the group (no root needed)."""
    from reuseport_standby.kernel.layout import Role
    from reuseport_standby.runner import Managed, Runner

    runner = Runner.__new__(Runner)
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    m = Managed(Role.PRIMARY, proc, os.pidfd_open(proc.pid), time.monotonic(), 1)
    try:
        runner._kill_group(m, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        sent = []
        real = os.killpg
        os.killpg = lambda *a: sent.append(a)  # type: ignore[assignment]
        try:
            runner._kill_group(m, signal.SIGKILL)  # reaped: its pid means nothing any more
        finally:
            os.killpg = real
        assert sent == []
    finally:
        os.close(m.pidfd)
