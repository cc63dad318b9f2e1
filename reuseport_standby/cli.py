"""The ``reuseport-standby`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .names import ENV_GROUP, ENV_SCOPE, ENV_SERVICE, ENV_USER, State
from . import __version__, project_conf, protocol, uvicorn_cli
from .errors import ReuseportStandbyError, SupervisorUnavailable, UsageError
from .kernel.pins import DEFAULT_PIN_ROOT
from .kernel.sockets import DEFAULT_BACKLOG, Address

if TYPE_CHECKING:
    from .runner import RunConfig

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


def _service(value: str) -> str:
    try:
        return protocol.check_service(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(value: str) -> Address:
    try:
        return Address.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reuseport-standby", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--service", type=_service, default=os.environ.get(ENV_SERVICE, protocol.DEFAULT_SERVICE),
                        help="service name (default: $REUSEPORT_STANDBY_SERVICE or 'default')")
        sp.add_argument("--control", default=None, help="control socket path (default: $REUSEPORT_STANDBY_CONTROL or /run/reuseport-standby/SERVICE.sock)")
        sp.add_argument("--pin-root", default=DEFAULT_PIN_ROOT, help=f"bpffs directory for pins (default {DEFAULT_PIN_ROOT})")

    sp = sub.add_parser("supervise", help="run the privileged supervisor of one service (foreground)")
    common(sp)
    sp.add_argument("--bind", type=_address, action="append", required=True, metavar="HOST:PORT",
                    help="address to serve; repeat for several (IPv6 as [::1]:8000)")
    sp.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help=f"listen() backlog of every socket (default {DEFAULT_BACKLOG})")
    sp.add_argument("--group", default=None, help="group allowed on the control socket (besides root and this user): "
                                                  "instances and status readers")
    sp.add_argument("--admin-group", default=None, metavar="GROUP",
                    help="group whose members may also send operator commands (weight, promote, drain, undrain); "
                         "without it only root and this user may. Its members need --group too, to reach the socket")
    sp.add_argument("--mount-bpffs", action="store_true", help="mount bpffs at /sys/fs/bpf (mode 0700) if it is not mounted")
    sp.add_argument("--no-migrate", action="store_true", help="load as plain SELECT (no queue migration; for comparisons only)")
    sp.add_argument("--stall-timeout", type=float, default=2.0,
                    help="demote an active instance whose queue waits this long with nothing accepted (seconds; 0 = off; default 2)")
    sp.add_argument("--on-hang", choices=("demote", "term", "kill"), default="demote",
                    help="after demoting a hung instance: keep it to recover (demote, default), SIGTERM or SIGKILL it")
    sp.add_argument("--metrics", type=_address, default=None, metavar="HOST:PORT",
                    help="serve Prometheus metrics here (needs prometheus_client)")
    sp.add_argument("--loader", choices=("libbpf", "bcc"), default="libbpf",
                    help="libbpf: load the packaged object (default); bcc: compile the C source at start (needs BCC and kernel headers)")
    sp.add_argument("--bpf-source", default=None, metavar="PATH",
                    help="with --loader bcc: your own variant of bpf/standby.bpf.c (docs/bpf-variants.md)")
    sp.add_argument("--max-connections-per-uid", type=int, default=None, metavar="N",
                    help="control connections one user other than root may hold at once; more are refused "
                         "(default 128: worker scope needs 68 during a rolling reload)")

    st = sub.add_parser("status", help="show addresses, instances, slots, queues and counters")
    common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")

    ck = sub.add_parser("check", help="exit 0 when the service (or one instance) serves: for systemd ExecStartPost and "
                                      "Kubernetes probes",
                        description="Ask the supervisor whether the service serves (some instance is active) or, with "
                                    "--pid/--pidfile, whether that instance is active. Exit 0 if so, 1 if not (the "
                                    "reason on stderr), 3 if no supervisor answers.")
    common(ck)
    who = ck.add_mutually_exclusive_group()
    who.add_argument("--pid", type=int, default=None, help="the instance's main process (e.g. systemd's $MAINPID)")
    who.add_argument("--pidfile", default=None, help="read the pid from this file (e.g. gunicorn --pid FILE)")
    ck.add_argument("--alive", action="store_true",
                    help="for liveness: pass while the instance is starting, drained or stopping too, and when no "
                         "supervisor answers; fail only when the supervisor demoted it as hung, or does not know it")
    ck.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="keep asking until it passes or SECONDS have passed (default: ask once)")

    rn = sub.add_parser("run", help="run a supervisor, a primary and a standby of a server command",
                        description="Run CMD (a gunicorn or uvicorn command line) as a primary and a standby "
                                    "sharing the --bind addresses, with zero-downtime restarts.")
    common(rn)
    rn.add_argument("--bind", type=_address, action="append", required=True, metavar="HOST:PORT")
    rn.add_argument("--backlog", type=int, default=None)
    rn.add_argument("--user", default=os.environ.get(ENV_USER), metavar="USER",
                    help="run the instances and all their workers as USER (no capabilities, no supplementary "
                         "groups); 'run' itself starts as root for the supervisor (default: $REUSEPORT_STANDBY_USER; "
                         "without it, as root, with a warning; '--user root' to say so on purpose)")
    rn.add_argument("--group", default=os.environ.get(ENV_GROUP), metavar="GROUP",
                    help="with --user: the instances' group (default: USER's primary group); either way the group "
                         "allowed on the control socket (default: $REUSEPORT_STANDBY_GROUP)")
    rn.add_argument("--admin-group", default=None, metavar="GROUP",
                    help="group whose members may send operator commands (passed to the supervisor)")
    rn.add_argument("--ready-timeout", type=float, default=60.0, help="seconds a new instance has to become ready (default 60)")
    rn.add_argument("--stop-timeout", type=float, default=30.0, help="seconds an instance has to drain before SIGKILL (default 30)")
    rn.add_argument("--scope", choices=("instance", "worker"), default=None,
                    help="instance (default): an instance's workers share its listeners; worker: every worker gets "
                         "listeners of its own (sets REUSEPORT_STANDBY_SCOPE for the instances)")
    rn.add_argument("--no-migrate", action="store_true", help=argparse.SUPPRESS)
    rn.add_argument("--stall-timeout", type=float, default=None, help="passed to the supervisor (see supervise --help)")
    rn.add_argument("--on-hang", choices=("demote", "term", "kill"), default=None, help="passed to the supervisor")
    rn.add_argument("--metrics", type=_address, default=None, metavar="HOST:PORT", help="passed to the supervisor")
    rn.add_argument("--loader", choices=("libbpf", "bcc"), default=None, help="passed to the supervisor")
    rn.add_argument("--bpf-source", default=None, metavar="PATH", help="passed to the supervisor")
    rn.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")

    wt = sub.add_parser("weight", help="canary: offer this share of new connections to the standby first")
    common(wt)
    wt.add_argument("--standby", type=int, required=True, metavar="PERCENT", help="0 (pure hot standby) to 100")

    pr = sub.add_parser("promote", help="swap the roles of the running primary and standby (nothing restarts)")
    common(pr)

    for name, text in (("drain", "stop sending new connections to an instance without stopping it"),
                       ("undrain", "send new connections to a drained or demoted instance again")):
        dr = sub.add_parser(name, help=text)
        common(dr)
        dr.add_argument("--role", choices=("primary", "standby"), required=True)

    rl = sub.add_parser("reload", help="rolling restart of a running 'run': standby, then primary; rolls back a failure")
    common(rl)
    rl.add_argument("--timeout", type=float, default=600.0)

    dm = sub.add_parser("demo", help="restart the primary under load, with and without reuseport-standby, and draw it")
    dm.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    dm.add_argument("--server", choices=("gunicorn", "uvicorn"), default="gunicorn")
    dm.add_argument("--baseline", action="store_true", help="the same script with plain SO_REUSEPORT, no BPF")
    dm.add_argument("--concurrency", type=int, default=16)
    dm.add_argument("--out", type=Path, default=None, help="where to write the PNG timeline")
    dm.add_argument("--kernel-only", action="store_true", help="only the kernel-level demonstration (no web server)")
    dm.add_argument("--connections", type=int, default=50, help="with --kernel-only: queued connections")
    uvicorn_cli.add_parser(sub)
    project_conf.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 and args.command in ("status", "check") else (
        logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except SupervisorUnavailable as exc:
        print(f"reuseport-standby: {printable(str(exc))}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except UsageError as exc:
        print(f"reuseport-standby: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (ReuseportStandbyError, ValueError) as exc:
        # A refusal from the supervisor (forbidden, malformed...) is a ProtocolError: one line, no traceback.
        print(f"reuseport-standby: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


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
                    print(f"reuseport-standby: {exc} (--alive passes)", file=sys.stderr)
                    return EXIT_OK
                code, problem = EXIT_NOT_RUNNING, str(exc)
            else:
                problem = check_status(st, pid, args.alive)
                code = EXIT_ERROR if problem else EXIT_OK
        if problem is None or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if problem:
        print(f"reuseport-standby: {printable(problem)}", file=sys.stderr)
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
        supervisor = SuperviseOptions(
            service=args.service, binds=tuple(args.bind), control=args.control, group=group,
            admin_group=args.admin_group, pin_root=args.pin_root, migrate=False if args.no_migrate else None,
            mount_bpffs=True,
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
    return RunConfig(supervisor=supervisor, command=command, ready_timeout=args.ready_timeout,
                     stop_timeout=args.stop_timeout, extra_env={ENV_SCOPE: args.scope} if args.scope else {}, user=user)


def cmd_admin(args: argparse.Namespace) -> int:
    from . import client

    msg: dict[str, object] = {"op": args.command}
    if args.command == "weight":
        msg["standby"] = args.standby
    elif args.command in ("drain", "undrain"):
        msg["role"] = args.role
    reply = client.admin(args.service, msg, args.control)
    if args.command == "weight":
        print(printable(f"standby weight: {reply['standby_weight']}%"))
    elif args.command == "promote":
        print(printable(f"promoted: instance(s) {reply['primary']} now primary, {reply['standby']} now standby"))
    else:
        print(printable(", ".join(f"instance {i['id']} (pid {i['pid']}) {i['state']}" for i in reply["instances"])))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from .run_client import request_reload

    result = request_reload(args.service, args.control, args.timeout)
    print("reloaded: " + ", ".join(f"{r['role']} pid {r['pid']}" for r in result["replaced"]) + f" in {result['seconds']} s")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.kernel_only:
        from .kernel_demo import kernel_demo

        return kernel_demo(args.connections)
    from .demo import demo

    return demo(args.duration, args.server, args.baseline, args.concurrency, args.out)


COMMANDS = {"supervise": cmd_supervise, "status": cmd_status, "check": cmd_check, "run": cmd_run, "reload": cmd_reload, "demo": cmd_demo,
            "weight": cmd_admin, "promote": cmd_admin, "drain": cmd_admin, "undrain": cmd_admin,
            "uvicorn": uvicorn_cli.command, "init": project_conf.command}

if __name__ == "__main__":
    raise SystemExit(main())
