"""uvicorn on a plain SO_REUSEPORT socket (no BPF): the benchmark's "plain pair" for ``--server uvicorn``.

uvicorn has no reuse-port option, so this binds the socket itself and hands
it to uvicorn the way ``uvicorn.run`` does with ``--workers``: one socket,
shared by the worker processes.  Two of these on one port form a kernel
reuseport group, which spreads new connections by a hash.

    python bench/plain_uvicorn.py HOST PORT APP [--workers N] [--backlog N] [--timeout-graceful-shutdown S] [--loop LOOP]
"""

from __future__ import annotations

import argparse
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("app")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backlog", type=int, default=2048)
    ap.add_argument("--timeout-graceful-shutdown", type=int, default=10)
    ap.add_argument("--loop", default="auto", help="uvicorn's event loop (name or import string of a factory)")
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    sock.listen(args.backlog)
    sock.set_inheritable(True)
    config = uvicorn.Config(args.app, workers=args.workers, backlog=args.backlog, log_level="warning",
                            access_log=False, loop=args.loop, timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    if config.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
