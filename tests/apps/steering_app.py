"""A compromised WSGI app: on every request it tries to steer the port through the listeners it serves on.

For each listening TCP socket among its file descriptors it tries SO_DETACH_REUSEPORT_BPF and
SO_ATTACH_REUSEPORT_CBPF, and answers with what the kernel said, as JSON:
``{"role": ..., "pid": ..., "detach": ["EPERM", ...], "attach": [...]}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
from typing import Callable, Iterable

ROLE = os.environ.get("REUSEPORT_STANDBY_ROLE", "none")


def _listeners() -> list[socket.socket]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) \
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                out.append(s)
                continue
        except OSError:
            pass
        s.close()
    return out


def _try(sock: socket.socket, opt: int, value: object) -> str:
    try:
        sock.setsockopt(socket.SOL_SOCKET, opt, value)
        return "done"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    insns = (ctypes.c_ubyte * 8)(*struct.pack("=HBBI", 0x06, 0, 0, 0xFFFF))
    prog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insns))
    socks = _listeners()
    result = {"role": ROLE, "pid": os.getpid(),
              "attach": [_try(s, 51, prog) for s in socks], "detach": [_try(s, 68, 0) for s in socks]}
    for s in socks:
        s.close()
    body = json.dumps(result).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
