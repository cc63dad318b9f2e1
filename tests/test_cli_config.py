"""The CLI's configuration surface, fast: options from REUSEPORT_STANDBY_<OPTION>, the logging options
and formats, what ``run`` passes on to its children."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.procs import REPO
from reuseport_standby import cli, envopts, logs
from reuseport_standby.errors import UsageError
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.supervisor.options import SuperviseOptions


def parse(argv: list[str], env: dict[str, str]) -> object:
    args, unknown = cli.build_parser(environ=env).parse_known_args(argv)
    assert not unknown
    envopts.check(args)
    return args


# -- REUSEPORT_STANDBY_<OPTION> -----------------------------------------------------------------------------

def test_every_supervise_option_comes_from_the_environment() -> None:
    env = {"REUSEPORT_STANDBY_BIND": "127.0.0.1:8000 [::1]:8000", "REUSEPORT_STANDBY_SERVICE": "shop",
           "REUSEPORT_STANDBY_STALL_TIMEOUT": "5", "REUSEPORT_STANDBY_ON_HANG": "term",
           "REUSEPORT_STANDBY_MOUNT_BPFFS": "yes", "REUSEPORT_STANDBY_NO_MIGRATE": "0",
           "REUSEPORT_STANDBY_BACKLOG": "64", "REUSEPORT_STANDBY_MAX_CONNECTIONS_PER_UID": "9",
           "REUSEPORT_STANDBY_METRICS": "127.0.0.1:9100", "REUSEPORT_STANDBY_PIN_ROOT": "/sys/fs/bpf/x",
           "REUSEPORT_STANDBY_GROUP": "nogroup", "REUSEPORT_STANDBY_CONTROL": "/tmp/x.sock"}
    opts = SuperviseOptions.from_args(parse(["supervise"], env))
    assert opts == SuperviseOptions(service="shop", binds=("127.0.0.1:8000", "[::1]:8000"), control="/tmp/x.sock",
                                    backlog=64, group="nogroup", pin_root="/sys/fs/bpf/x", mount_bpffs=True,
                                    stall_timeout=5.0, on_hang="term", max_connections_per_uid=9,
                                    metrics=Address("127.0.0.1", 8000 + 1100))


def test_the_flag_wins_over_the_variable_also_for_repeatable_options() -> None:
    env = {"REUSEPORT_STANDBY_BIND": "127.0.0.1:8000 127.0.0.1:8001", "REUSEPORT_STANDBY_STALL_TIMEOUT": "5",
           "REUSEPORT_STANDBY_MOUNT_BPFFS": "1"}
    args = parse(["supervise", "--bind", "127.0.0.1:9000", "--stall-timeout", "2"], env)
    assert args.bind == [Address("127.0.0.1", 9000)], "the variable's list is replaced, not extended"
    assert args.stall_timeout == 2.0 and args.mount_bpffs is True
    two = parse(["supervise", "--bind", "127.0.0.1:9000", "--bind", "127.0.0.1:9001"], env)
    assert two.bind == [Address("127.0.0.1", 9000), Address("127.0.0.1", 9001)]
    assert parse(["supervise"], env).bind == [Address("127.0.0.1", 8000), Address("127.0.0.1", 8001)]
    # a parser built with no variables still requires --bind
    with pytest.raises(UsageError, match="--bind"):
        parse(["supervise"], {})


def test_run_options_come_from_the_environment_too() -> None:
    env = {"REUSEPORT_STANDBY_BIND": "127.0.0.1:8000", "REUSEPORT_STANDBY_READY_TIMEOUT": "9",
           "REUSEPORT_STANDBY_SCOPE": "worker", "REUSEPORT_STANDBY_USER": "nobody",
           "REUSEPORT_STANDBY_LOADER": "bcc"}
    args = parse(["run", "--", "gunicorn", "app:app"], env)
    assert (args.bind, args.ready_timeout, args.scope, args.user, args.loader) == (
        [Address("127.0.0.1", 8000)], 9.0, "worker", "nobody", "bcc")
    assert args.cmd == ["--", "gunicorn", "app:app"]


@pytest.mark.parametrize("var, value, words", [
    ("REUSEPORT_STANDBY_BIND", "127.0.0.1:8000 nonsense", "bad address 'nonsense'"),
    ("REUSEPORT_STANDBY_STALL_TIMEOUT", "-1", ">= 0"),
    ("REUSEPORT_STANDBY_BACKLOG", "many", "not an integer"),
    ("REUSEPORT_STANDBY_ON_HANG", "pray", "demote, term, kill"),
    ("REUSEPORT_STANDBY_MOUNT_BPFFS", "perhaps", "1/true/yes/on"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(var: str, value: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(["supervise"], {"REUSEPORT_STANDBY_BIND": "127.0.0.1:1", var: value})
    assert str(err.value).startswith(f"{var}={value!r}") and words in str(err.value), err.value


def test_a_bad_variable_of_one_command_does_not_break_another() -> None:
    """REUSEPORT_STANDBY_BIND means nothing to status: a bad one must not stop it."""
    args = parse(["status"], {"REUSEPORT_STANDBY_BIND": "nonsense", "REUSEPORT_STANDBY_SERVICE": "shop"})
    assert args.service == "shop"


def test_the_flag_wins_over_a_bad_variable_too() -> None:
    env = {"REUSEPORT_STANDBY_BIND": "nonsense", "REUSEPORT_STANDBY_SERVICE": "a/b",
           "REUSEPORT_STANDBY_MOUNT_BPFFS": "perhaps"}
    args = parse(["supervise", "--bind", "127.0.0.1:1", "--service", "ok", "--mount-bpffs"], env)
    assert (args.bind, args.service, args.mount_bpffs) == ([Address("127.0.0.1", 1)], "ok", True)
    with pytest.raises(UsageError, match="REUSEPORT_STANDBY_MOUNT_BPFFS"):
        parse(["supervise", "--bind", "127.0.0.1:1", "--service", "ok"], env)


def test_only_common_options_of_the_other_commands_read_variables() -> None:
    """An instance's environment has REUSEPORT_STANDBY_ROLE: an operator's 'drain' typed there must still
    need --role, and 'check' must not take REUSEPORT_STANDBY_PID."""
    env = {"REUSEPORT_STANDBY_ROLE": "primary", "REUSEPORT_STANDBY_PID": "1", "REUSEPORT_STANDBY_JSON": "1"}
    with pytest.raises(UsageError, match="--role"):
        parse(["drain"], env)
    args = parse(["check"], env)
    assert args.pid is None and args.json is False


# -- what `run` passes on -------------------------------------------------------------------------------------

def test_run_passes_its_children_none_of_its_option_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor gets its configuration on its command line, defaults left out: a variable it
    inherited would win over what run was told (REUSEPORT_STANDBY_STALL_TIMEOUT=5 with
    --stall-timeout 2, the default, would give it 5)."""
    from reuseport_standby import runner

    for k in [k for k in os.environ if k.startswith("REUSEPORT_STANDBY_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("REUSEPORT_STANDBY_STALL_TIMEOUT", "5")
    monkeypatch.setenv("REUSEPORT_STANDBY_BIND", "127.0.0.1:8000")
    monkeypatch.setenv("REUSEPORT_STANDBY_SECCOMP", "off")  # for the instances: not an option, kept
    seen = {}
    monkeypatch.setattr(runner, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    assert cli.main(["run", "--stall-timeout", "2", "--user", "root", "--log-format", "json", "--",
                     "gunicorn", "app:app"]) == 0
    cfg = seen["cfg"]
    assert cfg.supervisor.stall_timeout == 2.0
    assert {"REUSEPORT_STANDBY_STALL_TIMEOUT", "REUSEPORT_STANDBY_BIND", "REUSEPORT_STANDBY_USER",
            "REUSEPORT_STANDBY_LOG_LEVEL"} <= cfg.drop_env
    # the ones instances read keep their meaning: run sets them itself
    assert not {"REUSEPORT_STANDBY_SERVICE", "REUSEPORT_STANDBY_CONTROL", "REUSEPORT_STANDBY_SCOPE",
                "REUSEPORT_STANDBY_ROLE", "REUSEPORT_STANDBY_SECCOMP"} & cfg.drop_env
    env = runner.child_env(cfg.drop_env)
    assert "REUSEPORT_STANDBY_STALL_TIMEOUT" not in env and env["REUSEPORT_STANDBY_SECCOMP"] == "off"
    argv = cfg.supervisor.argv()
    assert "--stall-timeout" not in argv, "the default is left out: the child must not read the variable"
    assert argv[-4:] == ["--log-level", "info", "--log-format", "json"], "the supervisor logs as run does"
    assert cfg.extra_env["REUSEPORT_STANDBY_LOG_FORMAT"] == "json"
    assert cfg.extra_env["REUSEPORT_STANDBY_LOG_LEVEL"] == "info"
    # and the supervisor's own parser takes what run passes
    assert SuperviseOptions.from_args(cli.build_parser(environ={}).parse_args(argv)).stall_timeout == 2.0


# -- logging options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, env, level", [
    (["status"], {}, logging.WARNING),
    (["supervise", "--bind", "127.0.0.1:1"], {}, logging.INFO),
    (["-v", "status"], {}, logging.INFO),
    (["status", "-v"], {}, logging.INFO),
    (["-v", "status", "-v"], {}, logging.DEBUG),
    (["status", "-vv"], {}, logging.DEBUG),
    (["status"], {"REUSEPORT_STANDBY_LOG_LEVEL": "debug"}, logging.DEBUG),
    (["-v", "status"], {"REUSEPORT_STANDBY_LOG_LEVEL": "error"}, logging.INFO),  # -v typed wins over the variable
    (["status", "--log-level", "error", "-vv"], {}, logging.ERROR),  # the flag wins over -v
    (["--log-level", "ERROR", "status"], {"REUSEPORT_STANDBY_LOG_LEVEL": "debug"}, logging.ERROR),
])
def test_log_level_from_flags_v_and_the_variable(argv: list[str], env: dict[str, str], level: int) -> None:
    args = parse(argv, {})
    assert cli.log_settings(args, env)[0] == level


def test_log_format_from_the_flag_or_the_variable() -> None:
    assert cli.log_settings(parse(["status"], {}), {})[1] == "text"
    assert cli.log_settings(parse(["status"], {}), {"REUSEPORT_STANDBY_LOG_FORMAT": "json"})[1] == "json"
    assert cli.log_settings(parse(["status", "--log-format", "text"], {}), {"REUSEPORT_STANDBY_LOG_FORMAT": "json"})[1] == "text"
    with pytest.raises(UsageError, match="REUSEPORT_STANDBY_LOG_FORMAT"):
        cli.log_settings(parse(["status"], {}), {"REUSEPORT_STANDBY_LOG_FORMAT": "xml"})


def _emit(fmt: str, stream: io.StringIO | object) -> None:
    logs.setup(logging.DEBUG, fmt, stream)  # type: ignore[arg-type]
    log = logging.getLogger("reuseport_standby.test")
    log.info("hello %s", "world")
    try:
        raise ValueError("inner")
    except ValueError:
        log.error("two\nlines", exc_info=True)


def test_json_lines_carry_the_pid_one_object_each() -> None:
    out = io.StringIO()
    _emit("json", out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = map(json.loads, lines)
    assert first["msg"] == "hello world" and first["level"] == "info" and first["pid"] == os.getpid()
    assert first["logger"] == "reuseport_standby.test" and first["ts"].endswith("Z")
    assert second["msg"] == "two\nlines" and "ValueError: inner" in second["exc"]


def test_text_lines_have_a_timestamp_and_the_pid() -> None:
    out = io.StringIO()
    _emit("text", out)
    first = out.getvalue().splitlines()[0]
    assert first[:4].isdigit() and f"reuseport_standby.test[{os.getpid()}] INFO hello world" in first, first


def test_under_journald_no_timestamp_a_priority_and_one_entry_per_record(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd tells a program that its stderr is the journal with JOURNAL_STREAM=DEV:INODE of that stream."""
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_journald(stream)
        _emit("text", stream)
        stream.flush()
        text = (tmp_path / "journal").read_text()
    lines = text.splitlines()
    assert lines[0] == f"<6>reuseport_standby.test[{os.getpid()}] INFO hello world", lines
    assert lines[1] == f"<3>reuseport_standby.test[{os.getpid()}] ERROR two" and lines[2] == "  lines", lines
    assert all(not line.startswith("<") for line in lines[2:]), "a continuation must not look like an entry"
    with open(tmp_path / "other", "w") as elsewhere:  # a child whose stderr went elsewhere is not the journal
        assert not logs.under_journald(elsewhere)
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not logs.under_journald(sys.stderr)


def test_setup_leaves_the_root_logger_alone() -> None:
    """An app server's logging (gunicorn, uvicorn: the root logger or their own) is not ours to change."""
    root_handlers = list(logging.getLogger().handlers)
    out = io.StringIO()
    logs.setup(logging.INFO, "text", out)
    logs.setup(logging.INFO, "json", out)  # twice: one handler, not two
    logging.getLogger("reuseport_standby.x").info("once")
    assert out.getvalue().count("once") == 1
    assert logging.getLogger().handlers == root_handlers


def test_json_logging_through_the_real_entry() -> None:
    """``-vv --log-format json`` after the subcommand, in a fresh process: every stderr line but the
    final one-line error is a JSON object with our pid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REUSEPORT_STANDBY_")}
    code = ("import sys; from reuseport_standby import cli\n"
            "def boom(args): raise RuntimeError('x')\n"
            "cli.COMMANDS['status'] = boom\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "status", "-vv", "--log-format", "json"], capture_output=True,
                       text=True, timeout=60, env={**env, "PYTHONPATH": str(REPO)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("reuseport-standby: unexpected error"), r.stderr
    docs = [json.loads(line) for line in lines[:-1]]
    assert docs and all(d["pid"] > 0 for d in docs) and "RuntimeError: x" in docs[-1]["exc"], docs
