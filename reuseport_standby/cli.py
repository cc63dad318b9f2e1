"""The ``reuseport-standby`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from . import __version__, protocol
from .errors import ReuseportStandbyError, SupervisorUnavailable
from .loader import DEFAULT_PIN_ROOT
from .sockets import DEFAULT_BACKLOG, Address

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
        sp.add_argument("--service", type=_service, default=os.environ.get("REUSEPORT_STANDBY_SERVICE", protocol.DEFAULT_SERVICE),
                        help="service name (default: $REUSEPORT_STANDBY_SERVICE or 'default')")
        sp.add_argument("--control", default=None, help="control socket path (default: $REUSEPORT_STANDBY_CONTROL or /run/reuseport-standby/SERVICE.sock)")
        sp.add_argument("--pin-root", default=DEFAULT_PIN_ROOT, help=f"bpffs directory for pins (default {DEFAULT_PIN_ROOT})")

    sp = sub.add_parser("supervise", help="run the privileged supervisor of one service (foreground)")
    common(sp)
    sp.add_argument("--bind", type=_address, action="append", required=True, metavar="HOST:PORT",
                    help="address to serve; repeat for several (IPv6 as [::1]:8000)")
    sp.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help=f"listen() backlog of every socket (default {DEFAULT_BACKLOG})")
    sp.add_argument("--group", default=None, help="group allowed on the control socket (besides root and this user)")
    sp.add_argument("--mount-bpffs", action="store_true", help="mount bpffs at /sys/fs/bpf if it is not mounted")
    sp.add_argument("--no-migrate", action="store_true", help="load as plain SELECT (no queue migration; for comparisons only)")

    st = sub.add_parser("status", help="show addresses, instances, slots, queues and counters")
    common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")

    dm = sub.add_parser("demo", help="show a primary's queued connections surviving its death (kernel-level)")
    dm.add_argument("--connections", type=int, default=50)
    dm.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 and args.command == "status" else (
        logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except SupervisorUnavailable as exc:
        print(f"reuseport-standby: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except (ReuseportStandbyError, ValueError) as exc:
        print(f"reuseport-standby: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def cmd_supervise(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor

    sup = Supervisor(args.service, args.bind, control=args.control, backlog=args.backlog, group=args.group,
                     pin_root=args.pin_root, migrate=False if args.no_migrate else None, mount_bpffs=args.mount_bpffs)
    sup.start()
    try:
        sup.serve_forever()
    finally:
        sup.close()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import status

    st = status.collect(args.service, args.control, args.pin_root)
    print(status.dumps(st) if args.json else status.render(st))
    return EXIT_OK if st.get("source") == "supervisor" else EXIT_NOT_RUNNING


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import kernel_demo

    return kernel_demo(args.connections, args.port)


COMMANDS = {"supervise": cmd_supervise, "status": cmd_status, "demo": cmd_demo}

if __name__ == "__main__":
    raise SystemExit(main())
