"""A hostile member of the control socket's group: it says hello, takes the listeners it is handed,
and tries to steer the port through them.

Usage: python group_attacker.py SERVICE CONTROL attach|detach-loop [SECONDS]
Starts as root (to import this checkout), then runs as nobody:nogroup.  Prints one JSON line.
  attach:       SO_ATTACH_REUSEPORT_CBPF of a program returning an out-of-range index (the kernel then
                spreads the port by hash over every member) through each handed listener.
  detach-loop:  SO_DETACH_REUSEPORT_BPF through a handed listener every millisecond for SECONDS, then
                stops, waits 0.5 s and exits (its listeners close: what waited on them migrates).
Bounded: at most 30 s.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import sys
import time

from reuseport_standby.client import InstanceClient

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68


def cbpf_return(k: int) -> tuple[bytes, object]:
    insns = (ctypes.c_ubyte * 8)(*struct.pack("=HBBI", 0x06, 0, 0, k))  # BPF_RET | BPF_K
    return struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insns)), insns


def main() -> int:
    service, control, action = sys.argv[1:4]
    seconds = min(float(sys.argv[4]) if len(sys.argv) > 4 else 1.0, 30.0)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    client = InstanceClient("standby", service, control=control, name="attacker", connect_timeout=5)
    listeners = client.open()
    out: dict[str, object] = {"uid": os.getuid()}
    if action == "attach":
        prog, keep = cbpf_return(0xFFFF)
        results = []
        for s in listeners:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)
                results.append("attached")
            except OSError as exc:
                results.append(errno.errorcode.get(exc.errno, str(exc.errno)))
        out["attach"] = results
        del keep
    elif action == "detach-loop":
        done, refused = 0, 0
        print("looping", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                listeners[0].setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
                done += 1
            except OSError:
                refused += 1  # ENOENT: nothing attached right now
            time.sleep(0.001)
        out.update(detached=done, nothing_to_detach=refused)
        time.sleep(0.5)
    print(json.dumps(out), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
