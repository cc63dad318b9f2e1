"""No traceback reaches a user: every mistake and every missing optional module is one line on stderr
and a documented exit status (0 ok, 1 error, 2 usage, 3 not running), from the real entry point.

Each case runs ``reuseport-standby`` in a fresh interpreter; an optional module is made unimportable
with ``sys.modules[name] = None`` before the CLI is imported, as if it were not installed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.procs import REPO

USAGE, ERROR, NOT_RUNNING = 2, 1, 3
NOWHERE = "/nonexistent/rs-test.sock"  # a control socket nobody listens on


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without our variables (a developer's shell may set some) nor the journal's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REUSEPORT_STANDBY_") and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def rs(*args: str, block: tuple[str, ...] = (), env: dict[str, str] | None = None, python: str = sys.executable,
       prefix: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    pre = "".join(f"sys.modules[{m!r}] = None; " for m in block)
    code = "import sys; " + pre + "from reuseport_standby.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([*prefix, python, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env(), cwd="/")


def assert_one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("reuseport-standby: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_the_catalogue_runs_through_python_dash_m() -> None:
    """The console entry itself (``python -m reuseport_standby``), not only ``cli.main``."""
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "weight", "--standby", "101"],
                       capture_output=True, text=True, timeout=60, env=clean_env(), cwd="/")
    assert_one_line(r, USAGE, "--standby", "101", "0 to 100")


# (id, arguments, modules made unimportable, environment, exit status, words of the one line)
CASES = [
    # -- a missing optional dependency: what to install, exit 1 --------------------------------------
    ("uvicorn --help without click", ["uvicorn", "--help"], ("click",), {}, ERROR,
     ["click", "pip install 'reuseport-standby[uvicorn]'"]),
    ("uvicorn without uvicorn", ["uvicorn", "--role", "primary", "app:app"], ("uvicorn",), {}, ERROR,
     ["uvicorn", "pip install 'reuseport-standby[uvicorn]'"]),
    ("supervise --metrics without prometheus_client",
     ["supervise", "--service", "m", "--bind", "127.0.0.1:1", "--metrics", "127.0.0.1:1", "--control", NOWHERE,
      "--pin-root", "/nonexistent/pins"], ("prometheus_client",), {}, ERROR,
     ["pip install 'reuseport-standby[metrics]'"]),
    # -- usage: refused before anything is contacted or started, exit 2 ---------------------------------
    ("no command", [], (), {}, USAGE, ["COMMAND"]),
    ("unknown command", ["serve"], (), {}, USAGE, ["invalid choice: 'serve'", "--help"]),
    ("unknown option", ["status", "--colour"], (), {}, USAGE, ["--colour", "status"]),
    ("bind without port", ["supervise", "--bind", "127.0.0.1"], (), {}, USAGE, ["--bind", "HOST:PORT"]),
    ("bind with a name", ["supervise", "--bind", "example.com:80"], (), {}, USAGE, ["--bind", "numeric"]),
    ("bind port 0", ["supervise", "--bind", "127.0.0.1:0"], (), {}, USAGE, ["--bind"]),
    ("bind bare IPv6", ["run", "--bind", "::1:80", "--", "gunicorn", "app:app"], (), {}, USAGE,
     ["--bind", "[IPV6]:PORT"]),
    ("service with a slash", ["status", "--service", "a/b"], (), {}, USAGE, ["--service"]),
    ("weight -1", ["weight", "--standby", "-1", "--control", NOWHERE], (), {}, USAGE, ["--standby", "0 to 100"]),
    ("weight 101", ["weight", "--standby", "101", "--control", NOWHERE], (), {}, USAGE, ["--standby", "0 to 100"]),
    ("weight abc", ["weight", "--standby", "abc", "--control", NOWHERE], (), {}, USAGE, ["--standby", "integer"]),
    ("negative stall timeout", ["supervise", "--bind", "127.0.0.1:1", "--stall-timeout", "-1"], (), {}, USAGE,
     ["--stall-timeout", ">= 0"]),
    ("check --wait abc", ["check", "--wait", "abc", "--control", NOWHERE], (), {}, USAGE, ["--wait"]),
    ("run without a command", ["run", "--bind", "127.0.0.1:1"], (), {}, USAGE, ["give the server command"]),
    ("run --ready-timeout 0", ["run", "--bind", "127.0.0.1:1", "--ready-timeout", "0", "--", "gunicorn", "a:b"],
     (), {}, USAGE, ["--ready-timeout"]),
    ("run --user nobody-such", ["run", "--bind", "127.0.0.1:1", "--user", "no-such-user-here", "--", "gunicorn",
                                "a:b"], (), {}, USAGE, ["unknown user"]),
    ("demo --duration 0", ["demo", "--duration", "0"], (), {}, USAGE, ["--duration"]),
    # -- a bad environment variable: a usage error that names it -----------------------------------------
    ("env bind", ["supervise"], (), {"REUSEPORT_STANDBY_BIND": "127.0.0.1"}, USAGE, ["REUSEPORT_STANDBY_BIND"]),
    ("env stall timeout", ["supervise", "--bind", "127.0.0.1:1"], (), {"REUSEPORT_STANDBY_STALL_TIMEOUT": "soon"},
     USAGE, ["REUSEPORT_STANDBY_STALL_TIMEOUT", "soon"]),
    ("env flag", ["supervise", "--bind", "127.0.0.1:1"], (), {"REUSEPORT_STANDBY_MOUNT_BPFFS": "maybe"}, USAGE,
     ["REUSEPORT_STANDBY_MOUNT_BPFFS"]),
    ("env choice", ["run", "--bind", "127.0.0.1:1", "--", "gunicorn", "a:b"], (), {"REUSEPORT_STANDBY_ON_HANG": "pray"},
     USAGE, ["REUSEPORT_STANDBY_ON_HANG", "demote"]),
    ("env service", ["status"], (), {"REUSEPORT_STANDBY_SERVICE": "a/b"}, USAGE, ["REUSEPORT_STANDBY_SERVICE"]),
    ("env log level", ["status", "--control", NOWHERE], (), {"REUSEPORT_STANDBY_LOG_LEVEL": "loud"}, USAGE,
     ["REUSEPORT_STANDBY_LOG_LEVEL"]),
    # -- nothing runs: exit 3 -------------------------------------------------------------------------------
    ("status, nothing runs", ["status", "--service", "nothing", "--control", NOWHERE, "--pin-root", "/nonexistent"],
     (), {}, NOT_RUNNING, ["no supervisor answers", "nothing is pinned"]),
    ("check, nothing runs", ["check", "--control", NOWHERE], (), {}, NOT_RUNNING, ["no supervisor answers"]),
    ("reload, nothing runs", ["reload", "--control", NOWHERE], (), {}, NOT_RUNNING, ["no 'reuseport-standby run'"]),
    ("promote, nothing runs", ["promote", "--control", NOWHERE], (), {}, NOT_RUNNING, ["no supervisor answers"]),
    ("drain, nothing runs", ["drain", "--role", "primary", "--control", NOWHERE], (), {}, NOT_RUNNING, []),
    ("weight, nothing runs", ["weight", "--standby", "5", "--control", NOWHERE], (), {}, NOT_RUNNING, []),
    # -- other failures: exit 1 ------------------------------------------------------------------------------
    ("check --pidfile missing", ["check", "--pidfile", "/nonexistent/app.pid", "--control", NOWHERE], (), {}, ERROR,
     ["cannot read a pid from /nonexistent/app.pid"]),
]


@pytest.mark.parametrize("args, block, env, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_and_the_documented_status(args: list[str], block: tuple[str, ...], env: dict[str, str], code: int,
                                            words: list[str]) -> None:
    assert_one_line(rs(*args, block=block, env=clean_env(**env)), code, *words)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_control_path_that_is_no_socket_is_not_running(tmp_path: Path, what: str) -> None:
    path = tmp_path / "ctl"
    path.write_text("") if what == "file" else path.mkdir()
    for args in (["status", "--pin-root", str(tmp_path / "pins")], ["check"], ["weight", "--standby", "5"]):
        assert_one_line(rs(*args, "--control", str(path)), NOT_RUNNING, str(path))


def test_a_partial_pin_directory_is_one_line(tmp_path: Path) -> None:
    """A pin directory left half-made (its maps gone): bpf_obj_get's FileNotFoundError was a traceback."""
    (tmp_path / "svc" / "127_0_0_1:8000").mkdir(parents=True)
    r = rs("status", "--service", "svc", "--pin-root", str(tmp_path), "--control", NOWHERE)
    assert_one_line(r, NOT_RUNNING, "not a complete pin directory", "127_0_0_1:8000", f"remove {tmp_path / 'svc'}")
    (tmp_path / "svc" / "127_0_0_1:8000").rmdir()
    (tmp_path / "svc" / "junk").mkdir()  # not ours at all
    assert_one_line(rs("status", "--service", "svc", "--pin-root", str(tmp_path), "--control", NOWHERE),
                    NOT_RUNNING, "junk")


UNEXPECTED = ("import sys; from reuseport_standby import cli\n"
              "def boom(args): raise RuntimeError('something nobody foresaw')\n"
              "cli.COMMANDS['status'] = boom\n"
              "sys.exit(cli.main(sys.argv[1:]))")


def test_an_unexpected_exception_is_one_line_and_its_traceback_is_behind_vv() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", UNEXPECTED, *args], capture_output=True, text=True, timeout=60,
                              env=clean_env(), cwd="/")

    line = assert_one_line(run("status"), ERROR, "RuntimeError: something nobody foresaw", "-vv")
    assert "bug" in line
    loud = run("status", "-vv")
    assert loud.returncode == ERROR and "Traceback" in loud.stderr and "boom" in loud.stderr, loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == line


def test_check_wait_says_what_it_waits_for(tmp_path: Path) -> None:
    """Progress while it waits (once per change of reason), then the one line of the outcome."""
    r = rs("check", "--wait", "1", "--control", NOWHERE)
    assert r.returncode == NOT_RUNNING and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("waiting (") and "no supervisor answers" in lines[0], lines
    assert lines[1].startswith("reuseport-standby: no supervisor answers"), lines
    j = rs("check", "--json", "--control", NOWHERE)
    import json

    doc = json.loads(j.stdout)
    assert j.returncode == NOT_RUNNING and doc["ok"] is False and doc["exit"] == NOT_RUNNING, (j.stdout, j.stderr)
    assert "no supervisor answers" in doc["problem"]


def test_help_is_prose_not_a_docstring() -> None:
    r = rs("--help")
    assert r.returncode == 0 and "exit status:" in r.stdout and "REUSEPORT_STANDBY_" in r.stdout
    assert "``" not in r.stdout, "a raw docstring"
    from reuseport_standby import cli

    parser = cli.build_parser(environ={})
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sp in subs.items():
        if name == "uvicorn":
            continue  # uvicorn's own options, with uvicorn's help
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_permission_denied_on_the_control_socket_as_nobody(tmp_path: Path, nobody_venv: Path) -> None:
    """A socket only root may use: nobody gets one line (exit 3), for status and an operator command."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as nobody")
    base = Path(__import__("tempfile").mkdtemp(prefix="rs-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        path = base / "c.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            srv.bind(str(path))
        finally:
            os.umask(old)
        srv.listen()
        as_nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--")
        python = str(nobody_venv / "bin" / "python")
        for args in (["status", "--pin-root", str(base / "pins")], ["weight", "--standby", "5"], ["check"]):
            r = rs(*args, "--control", str(path), python=python, prefix=as_nobody)
            assert_one_line(r, ERROR, "no permission to connect", str(path))  # may run: not 3
        srv.close()
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.kernel
def test_demo_without_matplotlib_prints_its_table_and_how_to_get_the_picture(kernel: None, tmp_path: Path) -> None:
    """It used to fail with ImportError after its whole run.  Now: a line at once saying so, progress
    lines for each restart as it happens, the table, the hint, and the exit status of the result."""
    out = tmp_path / "timeline.png"
    r = rs("demo", "--duration", "3", "--out", str(out), block=("matplotlib",), timeout=180)
    assert "Traceback" not in r.stderr and r.stderr.strip() == "", r.stderr
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and "NOTHING FAILED" in r.stdout, r.stdout
    assert any(line.startswith("no matplotlib") for line in lines[:3]), lines[:3]
    restarts = [line for line in lines if " s  primary SIG" in line or " s  rolling reload" in line]
    assert len(restarts) == 4, lines
    assert "served by standby" in r.stdout and "latency p50 / p99" in r.stdout
    assert lines[-1] == "no timeline picture: pip install 'reuseport-standby[demo]' (matplotlib) for the timeline picture"
    assert not out.exists()


@pytest.mark.kernel
def test_reload_says_each_step_as_it_happens_and_run_logs_json(kernel: None, pin_root: Path, short_tmp: Path) -> None:
    """A real ``run``: ``reload`` prints each step on stderr while the reload goes on (the first line
    comes well before the outcome), ``--json`` prints the outcome; ``run --log-format json`` makes its
    supervisor (a child with its own command line) log JSON too, each line with its own pid."""
    import json
    import time

    from test_run import GUNICORN, Run

    run = Run(short_tmp, pin_root, GUNICORN, args=["--log-format", "json", "--stop-timeout", "5"])
    try:
        run.wait_both()
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "reuseport_standby", "reload", "--json", "--service",
                                 run.service, "--control", run.control], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=clean_env(), cwd="/")
        seen: list[tuple[float, str]] = []
        assert proc.stderr is not None
        for line in proc.stderr:  # bounded: the process ends, and communicate's timeout below
            seen.append((time.monotonic() - started, line.rstrip("\n")))
            if len(seen) > 50:
                break
        out, _ = proc.communicate(timeout=120)
        ended = time.monotonic() - started
        texts = [t for _, t in seen]
        assert proc.returncode == 0, (texts, out)
        steps = [re.sub(r"\d+", "N", t) for t in texts]
        assert steps == ["reload: rolling reload: standby, then primary",
                         "reload: started new standby pid N; waiting up to N s for it to serve",
                         "reload: new standby pid N is serving; stopping old pid N",
                         "reload: old standby pid N stopped",
                         "reload: started new primary pid N; waiting up to N s for it to serve",
                         "reload: new primary pid N is serving; stopping old pid N",
                         "reload: old primary pid N stopped"], texts
        assert seen[0][0] < ended - 0.3, f"the first step came at {seen[0][0]:.2f} s, the end at {ended:.2f} s"
        result = json.loads(out)
        assert result["ok"] is True and [r["role"] for r in result["replaced"]] == ["standby", "primary"]
        assert set(run.active().values()) == {r["pid"] for r in result["replaced"]}
    finally:
        run.stop_and_check_nothing_left()
    ours = [json.loads(line) for line in run.log().splitlines() if line.startswith("{")]
    pids = {d["pid"] for d in ours if d["logger"] == "reuseport_standby.supervisor"}
    assert pids and run.proc.pid not in pids, "the supervisor logs JSON with its own pid"
    assert any(d["logger"] == "reuseport_standby.runner" and d["pid"] == run.proc.pid for d in ours)
    assert any("new primary pid" in d["msg"] for d in ours), "the steps are in run's log too"


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """``reuseport-standby status | head -1``: BrokenPipeError, once while printing, once at exit."""
    code = ("import sys; from reuseport_standby import cli\n"
            "def lots(args):\n"
            "    for i in range(200000): print('line', i)\n"
            "    return 0\n"
            "cli.COMMANDS['status'] = lots\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(), cwd="/")
    assert proc.stdout is not None and proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert err == b"" and proc.returncode == ERROR, err


def test_json_of_check_and_the_operator_commands(control_plane) -> None:
    """``--json``: the outcome on stdout as one object, the exit status as without it."""
    import json

    sup = control_plane()
    where = ["--service", sup.service, "--control", sup.control]
    r = rs("weight", "--standby", "30", "--json", *where)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["standby_weight"] == 30
    r = rs("check", "--json", "--wait", "0.5", *where)
    doc = json.loads(r.stdout)
    assert r.returncode == ERROR and doc["ok"] is False and doc["exit"] == ERROR, (r.stdout, r.stderr)
    assert doc["problem"].startswith("no active instance serves 127.0.0.1:")
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("waiting (") and lines[-1] == f"reuseport-standby: {doc['problem']}", lines
    r = rs("status", "--json", *where)
    assert r.returncode == 0 and json.loads(r.stdout)["addresses"][0]["standby_weight"] == 30
