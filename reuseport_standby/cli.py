"""The ``reuseport-standby`` command: one subcommand per job, one line per failure."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from .names import ENV_LOG_FORMAT, ENV_LOG_LEVEL, ENV_SCOPE, State
from . import __version__, envopts, logs, project_conf, protocol, uvicorn_cli
from .errors import ControlSocketDenied, ReuseportStandbyError, SupervisorUnavailable, UsageError
from .kernel.pins import DEFAULT_PIN_ROOT
from .kernel.sockets import DEFAULT_BACKLOG, Address

if TYPE_CHECKING:
    from .runner import RunConfig

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PROG = "reuseport-standby"
log = logging.getLogger("reuseport_standby.cli")


DESCRIPTION = textwrap.fill(
    "Zero-downtime restarts for gunicorn and uvicorn: a primary and a standby instance share a port "
    "through an eBPF SO_REUSEPORT program that a privileged supervisor loads. 'run' does it all from one "
    "command; 'supervise' plus the gunicorn/uvicorn integrations is the same in separate units.")

EPILOG = """\
exit status:
  0    done / it serves
  1    it failed (the reason on stderr, one line); also an unexpected error: re-run with -vv for the traceback
  2    usage: a bad option, option value or environment variable; nothing was started
  3    no supervisor (or no 'run') answers for the service
  130  interrupted (Ctrl-C)

environment:
  Every option of 'supervise' and 'run', and --service, --control, --pin-root, --log-level and --log-format of
  every command, may be given as REUSEPORT_STANDBY_<OPTION> (REUSEPORT_STANDBY_BIND="127.0.0.1:8000 [::1]:8000",
  REUSEPORT_STANDBY_STALL_TIMEOUT=5, REUSEPORT_STANDBY_MOUNT_BPFFS=1). A flag on the command line wins.

See 'reuseport-standby COMMAND --help', the README and docs/deployment.md."""


class Parser(argparse.ArgumentParser):
    """A usage error is one line (what is wrong, and where to read more), exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see '{self.prog} --help')")


def _typed(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a converter that raises ValueError with a message for the user."""
    def parse(value: str) -> Any:
        try:
            return convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


_service = _typed(protocol.check_service)
_address = _typed(Address.parse)


def _bounded(kind: Callable[[str], Any], low: float | None = None, high: float | None = None,
             what: str = "") -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = (f"from {low} to {high}" if high is not None else f">= {low}") if low is not None else f"<= {high}"
            raise ValueError(f"{value} is out of range: {what or 'it'} must be {bounds}")
        return number
    convert.__name__ = kind.__name__
    return _typed(convert)


def _health_target(value: str) -> str:
    from .health_check import HealthPathError, parse

    try:
        return str(parse(value, "the health path"))
    except HealthPathError as exc:
        raise ValueError(exc.args[0]) from None


_health_path = _typed(_health_target)
_health_path_or_off = _typed(lambda value: value and _health_target(value))  # reload: '' turns the check off
_seconds = _bounded(float, 0, what="seconds")
_positive_int = _bounded(int, 1)
_percent = _bounded(int, 0, 100, what="the standby's share")


def _logging_options(p: argparse.ArgumentParser, top: bool) -> None:
    """-v, --log-level and --log-format, before or after the subcommand (after: SUPPRESS keeps the
    value given before)."""
    default = None if top else argparse.SUPPRESS
    g = p.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="count", default=0, dest="verbose" if top else "verbose_sub",
                   help="more logging: -v info, -vv debug (and the traceback of an unexpected error)")
    g.add_argument("--log-level", choices=logs.LEVELS, default=default, type=str.lower,
                   help=f"log level of our loggers (overrides -v; env {ENV_LOG_LEVEL})")
    g.add_argument("--log-format", choices=logs.FORMATS, default=default,
                   help="text (default; without our timestamp when stderr is the systemd journal) or json: one "
                        f"object per line with ts, level, logger, pid, msg (env {ENV_LOG_FORMAT})")


def _common(sp: argparse.ArgumentParser) -> None:
    """The options that say which service: every command that talks to, or is, a supervisor."""
    sp.add_argument("--service", type=_service, default=protocol.DEFAULT_SERVICE,
                    help="service name: names the control socket and the pin directory (default 'default')")
    sp.add_argument("--control", default=None, metavar="PATH",
                    help=f"control socket path (default {protocol.CONTROL_DIR}/SERVICE.sock)")
    sp.add_argument("--pin-root", default=DEFAULT_PIN_ROOT, metavar="DIR",
                    help=f"bpffs directory for pins (default {DEFAULT_PIN_ROOT})")


def _json(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def add_supervise(sub: Any) -> argparse.ArgumentParser:
    sp = sub.add_parser("supervise", help="run the privileged supervisor of one service (foreground)",
                        description="Load the steering program, bind the --bind addresses and broker their "
                                    "listeners to the primary and standby instances of one service. Runs in the "
                                    "foreground until SIGTERM.")
    _common(sp)
    sp.add_argument("--bind", type=_address, action=envopts.ReplaceAppend, required=True, metavar="HOST:PORT",
                    help="address to serve; repeat for several (IPv6 as [::1]:8000)")
    sp.add_argument("--backlog", type=_positive_int, default=DEFAULT_BACKLOG,
                    help=f"listen() backlog of every socket (default {DEFAULT_BACKLOG})")
    sp.add_argument("--group", default=None, help="group allowed on the control socket (besides root and this user): "
                                                  "instances and status readers")
    sp.add_argument("--admin-group", default=None, metavar="GROUP",
                    help="group whose members may also send operator commands (weight, promote, drain, undrain); "
                         "without it only root and this user may. Its members need --group too, to reach the socket")
    sp.add_argument("--mount-bpffs", action="store_true", help="mount bpffs at /sys/fs/bpf (mode 0700) if it is not mounted")
    sp.add_argument("--no-migrate", action="store_true", help="load as plain SELECT (no queue migration; for comparisons only)")
    sp.add_argument("--stall-timeout", type=_seconds, default=2.0,
                    help="demote an active instance whose queue waits this long with nothing accepted (seconds; 0 = off; default 2)")
    sp.add_argument("--on-hang", choices=("demote", "term", "kill"), default="demote",
                    help="after demoting a hung instance: keep it to recover (demote, default), SIGTERM or SIGKILL it")
    sp.add_argument("--metrics", type=_address, default=None, metavar="HOST:PORT",
                    help="serve Prometheus metrics here (needs prometheus_client: pip install 'reuseport-standby[metrics]')")
    sp.add_argument("--loader", choices=("libbpf", "bcc"), default="libbpf",
                    help="libbpf: load the packaged object (default); bcc: compile the C source at start (needs BCC and kernel headers)")
    sp.add_argument("--bpf-source", default=None, metavar="PATH",
                    help="with --loader bcc: your own variant of bpf/standby.bpf.c (docs/bpf-variants.md)")
    sp.add_argument("--max-connections-per-uid", type=_positive_int, default=None, metavar="N",
                    help="control connections one user other than root may hold at once; more are refused "
                         "(default 128: worker scope needs 68 during a rolling reload)")
    return sp


def add_status(sub: Any) -> argparse.ArgumentParser:
    st = sub.add_parser("status", help="show addresses, instances, slots, queues and counters",
                        description="Ask the supervisor; when none answers, read the pinned maps (traffic may "
                                    "still flow) and exit 3.")
    _common(st)
    _json(st, "the status document")
    return st


def add_check(sub: Any) -> argparse.ArgumentParser:
    ck = sub.add_parser("check", help="exit 0 when the service (or one instance) serves: for systemd ExecStartPost and "
                                      "Kubernetes probes",
                        description="Ask the supervisor whether the service serves (some instance is active) or, with "
                                    "--pid/--pidfile, whether that instance is active. Exit 0 if so, 1 if not (the "
                                    "reason on stderr), 3 if no supervisor answers.")
    _common(ck)
    who = ck.add_mutually_exclusive_group()
    who.add_argument("--pid", type=_positive_int, default=None, help="the instance's main process (e.g. systemd's $MAINPID)")
    who.add_argument("--pidfile", default=None, metavar="PATH", help="read the pid from this file (e.g. gunicorn --pid FILE)")
    ck.add_argument("--alive", action="store_true",
                    help="for liveness: pass while the instance is starting, drained or stopping too, and when no "
                         "supervisor answers; fail only when the supervisor demoted it as hung, or does not know it")
    ck.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                    help="keep asking until it passes or SECONDS have passed, saying on stderr what it waits for "
                         "(default: ask once)")
    _json(ck, "the outcome ({\"ok\": ..., \"problem\": ...})")
    return ck


def add_run(sub: Any) -> argparse.ArgumentParser:
    rn = sub.add_parser("run", help="run a supervisor, a primary and a standby of a server command",
                        description="Run CMD (a gunicorn or uvicorn command line) as a primary and a standby "
                                    "sharing the --bind addresses, with zero-downtime restarts. SIGHUP or "
                                    "'reuseport-standby reload' replaces both, one at a time.")
    _common(rn)
    rn.add_argument("--bind", type=_address, action=envopts.ReplaceAppend, required=True, metavar="HOST:PORT",
                    help="address to serve; repeat for several (IPv6 as [::1]:8000)")
    rn.add_argument("--backlog", type=_positive_int, default=None,
                    help=f"listen() backlog of every socket (default {DEFAULT_BACKLOG})")
    rn.add_argument("--user", default=None, metavar="USER",
                    help="run the instances and all their workers as USER (no capabilities, no supplementary "
                         "groups); 'run' itself starts as root for the supervisor (without it, as root, with a "
                         "warning; '--user root' to say so on purpose)")
    rn.add_argument("--group", default=None, metavar="GROUP",
                    help="with --user: the instances' group (default: USER's primary group); either way the group "
                         "allowed on the control socket")
    rn.add_argument("--admin-group", default=None, metavar="GROUP",
                    help="group whose members may send operator commands (passed to the supervisor)")
    rn.add_argument("--ready-timeout", type=_bounded(float, 0.001, what="seconds"), default=60.0, metavar="SECONDS",
                    help="seconds a new instance has to become ready (default 60)")
    rn.add_argument("--stop-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                    help="seconds an instance has to drain before SIGKILL (default 30)")
    rn.add_argument("--scope", choices=("instance", "worker"), default=None,
                    help="instance (default): an instance's workers share its listeners; worker: every worker gets "
                         "listeners of its own (sets REUSEPORT_STANDBY_SCOPE for the instances)")
    rn.add_argument("--health-path", type=_health_path, default=None, metavar="PATH",
                    help="before a worker takes traffic, it calls its app in process with GET PATH (e.g. /healthz) "
                         "until it answers 2xx; a reload whose new instance never does rolls back (sets "
                         "REUSEPORT_STANDBY_HEALTH_PATH for the instances)")
    rn.add_argument("--no-migrate", action="store_true", help=argparse.SUPPRESS)
    rn.add_argument("--stall-timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="demote an active instance whose queue waits this long with nothing accepted (default 2; "
                         "passed to the supervisor, see supervise --help)")
    rn.add_argument("--on-hang", choices=("demote", "term", "kill"), default=None,
                    help="what to do with a hung instance after demoting it (passed to the supervisor)")
    rn.add_argument("--metrics", type=_address, default=None, metavar="HOST:PORT",
                    help="serve Prometheus metrics here (passed to the supervisor)")
    rn.add_argument("--loader", choices=("libbpf", "bcc"), default=None,
                    help="how the supervisor loads the program (see supervise --help)")
    rn.add_argument("--bpf-source", default=None, metavar="PATH", help="with --loader bcc: your own program source")
    rn.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                    help="the server command line, after '--': gunicorn ... or uvicorn ... (the integration is added)")
    return rn


def add_weight(sub: Any) -> argparse.ArgumentParser:
    wt = sub.add_parser("weight", help="canary: offer this share of new connections to the standby first")
    _common(wt)
    wt.add_argument("--standby", type=_percent, required=True, metavar="PERCENT",
                    help="0 (pure hot standby) to 100")
    _json(wt, "the supervisor's reply")
    return wt


def add_promote(sub: Any) -> argparse.ArgumentParser:
    pr = sub.add_parser("promote", help="swap the roles of the running primary and standby (nothing restarts)")
    _common(pr)
    _json(pr, "the supervisor's reply")
    return pr


def _add_drain(name: str, text: str) -> Callable[[Any], argparse.ArgumentParser]:
    def add(sub: Any) -> argparse.ArgumentParser:
        dr = sub.add_parser(name, help=text)
        _common(dr)
        dr.add_argument("--role", choices=("primary", "standby"), required=True, help="which instance")
        _json(dr, "the supervisor's reply")
        return dr
    return add


def add_reload(sub: Any) -> argparse.ArgumentParser:
    rl = sub.add_parser("reload", help="rolling restart of a running 'run': standby, then primary; rolls back a failure",
                        description="Ask a running 'reuseport-standby run' for a rolling reload and wait for it, "
                                    "printing each step on stderr as it happens. Exit 0 when both instances were "
                                    "replaced, 1 when it rolled back (the old ones keep serving), 3 when no 'run' "
                                    "answers. With --canary, the new version first serves as the standby with "
                                    "the given shares of new connections, and is promoted only if its error "
                                    "rate and p99 latency hold up against the old version's.")
    _common(rl)
    rl.add_argument("--timeout", type=_bounded(float, 0.001, what="seconds"), default=None, metavar="SECONDS",
                    help="give up waiting after this long (default 600, or the canary's longest possible "
                         "duration plus 600; the reload itself goes on)")
    rl.add_argument("--health-path", type=_health_path_or_off, default=None, metavar="PATH",
                    help="from this reload on, each worker GETs PATH in process and must get a 2xx before its "
                         "instance is activated ('' turns the check off)")
    cn = rl.add_argument_group("canary", "judge the new version on a share of the traffic before promoting it")
    cn.add_argument("--canary", type=_weights, default=None, metavar="W1,W2,...",
                    help="standby weights in percent, rising, e.g. 10,50: the new version's share at each step")
    cn.add_argument("--step-seconds", type=_bounded(float, 0.5, 86400, what="seconds"), default=None,
                    metavar="SECONDS", help="how long each step lasts (default 30)")
    cn.add_argument("--max-error-rate", type=_bounded(float, 0, 1, what="the error rate"), default=None,
                    metavar="FRACTION", help="a step fails when the new version's share of 5xx, exceptions and "
                                             "missing responses exceeds the old version's by more (default 0.01)")
    cn.add_argument("--max-latency-ratio", type=_bounded(float, 1, 1000, what="the ratio"), default=None,
                    metavar="RATIO", help="a step fails when the new version's p99 latency exceeds the old "
                                          "version's this many times (default 2)")
    cn.add_argument("--min-requests", type=_bounded(int, 0, 10**9, what="the count"), default=None, metavar="N",
                    help="requests the new version must get in a step to be judged; a step waits up to "
                         "--max-step-seconds for them, then the reload rolls back (default 100)")
    cn.add_argument("--max-step-seconds", type=_bounded(float, 0.5, 7 * 86400, what="seconds"), default=None,
                    metavar="SECONDS", help="longest a step waits for --min-requests (default 5 x --step-seconds)")
    _json(rl, "the outcome (also of a rolled-back canary)")
    return rl


def _parse_weights(value: str) -> list[int]:
    try:
        weights = [int(w) for w in value.split(",")]
    except ValueError:
        raise ValueError(f"{value!r} is not a list of whole percentages such as 10,50") from None
    from .canary import CanaryPlan

    CanaryPlan.from_wire({"weights": weights})  # says what is wrong with them
    return weights
_weights = _typed(_parse_weights)
CANARY_OPTIONS = ("step_seconds", "max_error_rate", "max_latency_ratio", "min_requests", "max_step_seconds")


def add_demo(sub: Any) -> argparse.ArgumentParser:
    dm = sub.add_parser("demo", help="restart the primary under load, with and without reuseport-standby, and draw it",
                        description="Run the bundled app under 'reuseport-standby run' on a free loopback port, "
                                    "restart it four ways under load, print what the clients saw and draw a PNG "
                                    "timeline (needs matplotlib: pip install 'reuseport-standby[demo]'). Exit 0 "
                                    "when no request failed.")
    dm.add_argument("--duration", type=_bounded(float, 1, what="seconds"), default=20.0,
                    help="seconds of load (default 20)")
    dm.add_argument("--server", choices=("gunicorn", "uvicorn"), default="gunicorn", help="the app server (default gunicorn)")
    dm.add_argument("--baseline", action="store_true", help="the same script with plain SO_REUSEPORT, no BPF")
    dm.add_argument("--concurrency", type=_positive_int, default=16, help="load clients (default 16)")
    dm.add_argument("--out", type=Path, default=None, metavar="PNG", help="where to write the PNG timeline")
    dm.add_argument("--bad-version", action="store_true",
                    help="instead: deploy a version answering 500 to 1 request in 5 with 'reload --canary' and see "
                         "it rolled back by itself, then a good one promoted (--duration: seconds per canary step x5)")
    dm.add_argument("--kernel-only", action="store_true", help="only the kernel-level demonstration (no web server)")
    dm.add_argument("--connections", type=_positive_int, default=50, help="with --kernel-only: queued connections")
    return dm


#: options of these subcommands may come from REUSEPORT_STANDBY_<OPTION>; of the others, only these
ENV_ALL_OPTIONS = ("supervise", "run")
ENV_COMMON = ("service", "control", "pin_root")


def build_parser(environ: dict[str, str] | None = None) -> Parser:
    """The whole command line, with its defaults from the environment (``environ``: os.environ).  A bad
    variable is refused after parsing (``envopts.check``), only when its option is not given."""
    p = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _logging_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add, _ in SUBCOMMANDS:
        sp = add(sub)
        if name != "uvicorn":
            _logging_options(sp, top=False)
            skip = () if name in ENV_ALL_OPTIONS else [a.dest for a in envopts.options(sp) if a.dest not in ENV_COMMON]
            envopts.apply(sp, environ, skip=[*skip, "log_level", "log_format", "verbose_sub"])
    return p


def log_settings(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[int, str]:
    """(level, format): a flag wins over -v, -v over the variable, the variable over the command's default."""
    verbose = args.verbose + getattr(args, "verbose_sub", 0)
    name = args.log_level or (None if verbose else environ.get(ENV_LOG_LEVEL, "").strip().lower() or None)
    if name is not None and name not in logs.LEVELS:
        raise UsageError(f"{ENV_LOG_LEVEL}={name!r}: must be one of {', '.join(logs.LEVELS)}")
    fmt = args.log_format or environ.get(ENV_LOG_FORMAT, "").strip().lower() or "text"
    if fmt not in logs.FORMATS:
        raise UsageError(f"{ENV_LOG_FORMAT}={fmt!r}: must be one of {', '.join(logs.FORMATS)}")
    quiet = args.command in ("status", "check", "weight", "promote", "drain", "undrain", "reload")
    return logs.level_from(name, verbose, logging.WARNING if quiet else logging.INFO), fmt


#: optional dependency (top-level module) -> the extra that brings it
EXTRAS = {"click": "uvicorn", "uvicorn": "uvicorn", "gunicorn": "gunicorn", "flask": "demo", "matplotlib": "demo",
          "prometheus_client": "metrics"}


def _say(message: str) -> None:
    print(f"{PROG}: {printable(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.  Every failure is one line on stderr and an exit status (see EPILOG); an
    unexpected exception too, its traceback logged at debug level (-vv)."""
    args: argparse.Namespace | None = None
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            raise UsageError(f"{args.command}: unrecognized arguments: {' '.join(unknown)} "
                             f"(see '{PROG} {args.command} --help')")
        envopts.check(args)
        level, fmt = log_settings(args)
        args.log_level_value, args.log_format = level, fmt
        logs.setup(level, fmt)
        return COMMANDS[args.command](args)
    except ControlSocketDenied as exc:  # a supervisor may run: not "not running"
        _say(str(exc))
        return EXIT_ERROR
    except SupervisorUnavailable as exc:
        _say(str(exc))
        return EXIT_NOT_RUNNING
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except (ReuseportStandbyError, ValueError) as exc:
        # A refusal from the supervisor (forbidden, malformed...) is a ProtocolError: one line, no traceback.
        _say(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `status | head`: the reader left; nothing to say (and nothing to flush at exit)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        log.debug("import failed", exc_info=True)
        if not top or top == "reuseport_standby":  # our own import failing is a bug, not a missing module
            _say(f"unexpected error: {type(exc).__name__}: {exc} (a bug: re-run with -vv for the traceback and "
                 "report it)")
            return EXIT_ERROR
        extra = EXTRAS.get(top)
        what = f"'{PROG} {args.command}'" if args is not None else PROG
        hint = f"pip install 'reuseport-standby[{extra}]'" if extra else f"install the Python module {top}"
        _say(f"{what} needs the Python module {top}, which cannot be imported ({exc}): {hint}")
        return EXIT_ERROR
    except OSError as exc:
        log.debug("failed", exc_info=True)
        where = f" ({exc.filename})" if exc.filename else ""
        _say(f"{exc.strerror or exc}{where}")
        return EXIT_ERROR
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        _say(f"unexpected error: {type(exc).__name__}: {exc} (a bug: re-run with -vv for the traceback and "
             "report it)")
        return EXIT_ERROR


def printable(text: str) -> str:
    """What reaches the terminal may quote a peer: non-printable characters escaped (status.printable)."""
    from .status import printable

    return printable(text)


def cmd_supervise(args: argparse.Namespace) -> int:
    from .supervisor import SuperviseOptions, Supervisor

    if args.metrics:
        from .metrics import require_client

        require_client()  # before anything is loaded or pinned
    sup = Supervisor(SuperviseOptions.from_args(args))
    sup.start()
    try:
        if args.metrics:
            from .metrics import serve

            serve(sup, args.metrics)
        sup.serve_forever()
    finally:
        sup.close()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import status

    st = status.collect(args.service, args.control, args.pin_root)
    print(status.dumps(st) if args.json else status.render(st))
    return EXIT_OK if st.get("source") == "supervisor" else EXIT_NOT_RUNNING


ALIVE_STATES = tuple(s.value for s in State if s is not State.DEMOTED)


def check_status(st: dict, pid: int | None, alive: bool = False) -> str | None:
    """Why ``check`` fails on this status (None: it passes)."""
    instances = st.get("instances", [])
    if pid is None:
        for a in st["addresses"]:
            if not any(not s["disabled"] for s in a["slots"]):  # a live, enabled instance slot
                return f"no active instance serves {a['address']}"
        return None
    mine = [i for i in instances if i["pid"] == pid]
    if not mine:
        return f"the supervisor knows no instance with pid {pid}"
    states = sorted({i["state"] for i in mine})
    ok = ALIVE_STATES if alive else ("active",)
    if any(s in ok for s in states):
        return None
    demoted = [i["demoted_for"] for i in mine if i.get("demoted_for")]
    return f"instance pid {pid} is {', '.join(states)}" + (f" ({demoted[0]})" if demoted else "")


def cmd_check(args: argparse.Namespace) -> int:
    import time

    from . import client

    deadline = time.monotonic() + max(0.0, args.wait)
    said = None
    while True:
        code, problem = EXIT_OK, None
        pid = args.pid
        if args.pidfile:
            try:
                pid = int(Path(args.pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError) as exc:
                code, problem = EXIT_ERROR, f"cannot read a pid from {args.pidfile}: {exc}"
        if problem is None:
            try:
                st = client.query(args.service, "status", args.control)["status"]
            except SupervisorUnavailable as exc:
                if args.alive:  # no supervisor is no sign of a hung instance: never restart instances for it
                    _say(f"{exc} (--alive passes)")
                    return _check_result(args, EXIT_OK, None, pid)
                code, problem = EXIT_ERROR if isinstance(exc, ControlSocketDenied) else EXIT_NOT_RUNNING, str(exc)
            else:
                problem = check_status(st, pid, args.alive)
                code = EXIT_ERROR if problem else EXIT_OK
        if problem is None or time.monotonic() >= deadline:
            break
        if problem != said:  # progress: what it waits for, each time that changes
            print(printable(f"waiting ({deadline - time.monotonic():.0f} s left): {problem}"), file=sys.stderr, flush=True)
            said = problem
        time.sleep(0.2)
    if problem:
        _say(problem)
    return _check_result(args, code, problem, pid)


def _check_result(args: argparse.Namespace, code: int, problem: str | None, pid: int | None) -> int:
    if args.json:
        print(json.dumps({"ok": code == EXIT_OK, "exit": code, "problem": problem, "service": args.service, "pid": pid}))
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    return run(run_config(args))


ROOT_WARNING = ("the instances will run as root, with every capability of this process: the app could detach "
                "or replace the steering program, read the pins and kill the supervisor. Give --user (systemd: "
                "the unit's --user), or '--user root' to keep this on purpose (docs/deployment.md)")


def run_config(args: argparse.Namespace) -> RunConfig:
    """Check the whole ``run`` command line before anything starts: a refusal is one line, exit status 2."""
    from .runner import InstanceUser, RunConfig, group_name, main_args, resolve_user
    from .supervisor.options import SuperviseOptions
    from .wrap import check_command

    try:
        command = main_args(args.cmd)
        check_command(command)
        user: InstanceUser | None = None
        group = args.group
        if args.user is not None:
            user = resolve_user(args.user, args.group)
            if user is not None and group is None:
                group = group_name(user.gid)  # the instances reach the control socket through their group
        elif os.geteuid() == 0:
            logging.getLogger("reuseport_standby.run").warning("running without --user: %s", ROOT_WARNING)
        level, fmt = getattr(args, "log_level_value", logging.INFO), getattr(args, "log_format", "text")
        supervisor = SuperviseOptions(
            service=args.service, binds=tuple(args.bind), control=args.control, group=group,
            admin_group=args.admin_group, pin_root=args.pin_root, migrate=False if args.no_migrate else None,
            mount_bpffs=True,
            # the supervisor logs as 'run' does (its own command line: the variables are not passed on)
            extra=("--log-level", logging.getLevelName(level).lower(), "--log-format", fmt),
            **{name: value for name, value in (("backlog", args.backlog), ("stall_timeout", args.stall_timeout),
                                               ("on_hang", args.on_hang), ("metrics", args.metrics),
                                               ("loader", args.loader),
                                               ("bpf_source", os.path.abspath(args.bpf_source) if args.bpf_source else None))
               if value is not None}).check()
        if group is not None:
            from .supervisor.peers import resolve_group

            resolve_group(group)
        if args.ready_timeout <= 0 or args.stop_timeout < 0:
            raise ValueError("--ready-timeout must be > 0 and --stop-timeout >= 0")
    except (ValueError, ReuseportStandbyError) as exc:
        raise UsageError(f"run: {exc}") from None
    extra_env = {ENV_SCOPE: args.scope} if args.scope else {}
    # an instance under our CLI ('reuseport-standby uvicorn') logs ours alike; gunicorn's follow gunicorn's
    extra_env.update({ENV_LOG_LEVEL: logging.getLevelName(level).lower(), ENV_LOG_FORMAT: fmt})
    return RunConfig(supervisor=supervisor, command=command, ready_timeout=args.ready_timeout,
                     stop_timeout=args.stop_timeout, extra_env=extra_env, user=user, drop_env=option_variables(),
                     health_path=args.health_path)


def option_variables() -> frozenset[str]:
    """The REUSEPORT_STANDBY_<OPTION> variables of 'supervise' and 'run' (not the ones the instances read,
    which 'run' sets itself): 'run' passes its children none of them.  Its supervisor gets its whole
    configuration on its command line, where a default is left out: a variable it inherited would
    then win over what 'run' was told."""
    p = build_parser(environ={})
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    shared = {"REUSEPORT_STANDBY_SERVICE", "REUSEPORT_STANDBY_CONTROL", "REUSEPORT_STANDBY_SCOPE"}
    found = {*envopts.names(subs["supervise"]), *envopts.names(subs["run"]), ENV_LOG_LEVEL}
    return frozenset(found - shared)


def cmd_admin(args: argparse.Namespace) -> int:
    from . import client

    msg: dict[str, object] = {"op": args.command}
    if args.command == "weight":
        msg["standby"] = args.standby
    elif args.command in ("drain", "undrain"):
        msg["role"] = args.role
    reply = client.admin(args.service, msg, args.control)
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    elif args.command == "weight":
        print(printable(f"standby weight: {reply['standby_weight']}%"))
    elif args.command == "promote":
        print(printable(f"promoted: instance(s) {reply['primary']} now primary, {reply['standby']} now standby"))
    else:
        print(printable(", ".join(f"instance {i['id']} (pid {i['pid']}) {i['state']}" for i in reply["instances"])))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from .canary import CanaryPlan
    from .run_client import CanaryFailed, request_reload

    def progress(event: dict[str, Any]) -> None:
        print(printable(f"reload: {event.get('progress')}"), file=sys.stderr, flush=True)

    options: dict[str, Any] = {}
    if args.health_path is not None:
        options["health_path"] = args.health_path
    timeout = args.timeout
    if args.canary is not None:
        plan = CanaryPlan.from_wire({"weights": args.canary, **{n: getattr(args, n) for n in CANARY_OPTIONS
                                                                 if getattr(args, n) is not None}})
        options["canary"] = plan.to_wire()
        if timeout is None:
            timeout = 600.0 + len(plan.weights) * plan.step_limit
    else:
        given = [f"--{n.replace('_', '-')}" for n in CANARY_OPTIONS if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} applies to a canary: add --canary W1,W2,...")
    try:
        result = request_reload(args.service, args.control, 600.0 if timeout is None else timeout,
                                progress=progress, options=options)
    except CanaryFailed as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": "rolled_back", "message": str(exc), **exc.fields},
                             sort_keys=True))
        raise
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print("reloaded: " + ", ".join(f"{r['role']} pid {r['pid']}{' (promoted)' if r.get('promoted') else ''}"
                                       for r in result["replaced"]) + f" in {result['seconds']} s")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.kernel_only:
        from .kernel_demo import kernel_demo

        return kernel_demo(args.connections)
    if args.bad_version:
        if args.baseline:
            raise UsageError("--bad-version has no --baseline: without a canary the bad version simply serves")
        from .demo_canary import demo_canary

        return demo_canary(args.duration / 5, args.server, args.concurrency, args.out)
    from .demo import demo

    return demo(args.duration, args.server, args.baseline, args.concurrency, args.out)


#: (name, how to add its parser, what runs it), in --help's order.  A new subcommand is one more row.
SUBCOMMANDS: list[tuple[str, Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = [
    ("supervise", add_supervise, cmd_supervise),
    ("status", add_status, cmd_status),
    ("check", add_check, cmd_check),
    ("run", add_run, cmd_run),
    ("reload", add_reload, cmd_reload),
    ("weight", add_weight, cmd_admin),
    ("promote", add_promote, cmd_admin),
    ("drain", _add_drain("drain", "stop sending new connections to an instance without stopping it"), cmd_admin),
    ("undrain", _add_drain("undrain", "send new connections to a drained or demoted instance again"), cmd_admin),
    ("demo", add_demo, cmd_demo),
    ("uvicorn", uvicorn_cli.add_parser, uvicorn_cli.command),
    ("init", project_conf.add_parser, project_conf.command),
]
COMMANDS = {name: run for name, _, run in SUBCOMMANDS}

if __name__ == "__main__":
    raise SystemExit(main())
