"""Accept-queue depth of listening sockets, from the kernel's sock_diag.

Asked over NETLINK_SOCK_DIAG (what ``ss`` uses) rather than by parsing
``ss``; listeners are matched by socket cookie, the same identity the
sockarray reports.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
_REQ_V2 = struct.Struct("=BBBxI48x")


@dataclass(frozen=True)
class ListenerQueue:
    cookie: int
    family: int
    port: int
    queued: int    # connections waiting in the accept queue
    backlog: int   # the listen() backlog
    uid: int
    inode: int = 0
    host: str = ""  # the address it is bound to ("0.0.0.0", "::" for any)


def listeners(families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)) -> dict[int, ListenerQueue]:
    """All TCP listeners of this network namespace, by socket cookie."""
    out: dict[int, ListenerQueue] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2)
        for seq, family in enumerate(families, 1):
            body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
            nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
            done = False
            while not done:
                data = nl.recv(1 << 16)
                off = 0
                while off + _NLMSGHDR.size <= len(data):
                    length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data, off)
                    if mtype == NLMSG_DONE:
                        done = True
                        break
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                        raise OSError(err, "sock_diag dump failed")
                    if mtype == SOCK_DIAG_BY_FAMILY:
                        q = _parse(data, off + _NLMSGHDR.size)
                        out[q.cookie] = q
                    off += (length + 3) & ~3
                    if length == 0:
                        break
    return out


def _parse(data: bytes, off: int) -> ListenerQueue:
    fam = data[off]
    sport = struct.unpack_from("!H", data, off + 4)[0]
    src = data[off + 8: off + 8 + (16 if fam == socket.AF_INET6 else 4)]
    c0, c1 = struct.unpack_from("=II", data, off + 4 + 4 + 32 + 4)
    _expires, rq, wq, uid, inode = struct.unpack_from("=IIIII", data, off + 4 + 48)
    return ListenerQueue(cookie=c0 | (c1 << 32), family=fam, port=sport, queued=rq, backlog=wq, uid=uid, inode=inode,
                         host=socket.inet_ntop(fam, src))
