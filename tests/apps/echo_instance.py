"""A minimal HTTP instance speaking the control protocol directly (no web server).

Usage: python echo_instance.py ROLE SERVICE CONTROL [--as-nobody] [--no-ready]
Answers every request with "<role> <pid>" so tests can tell who served it.
On SIGTERM: leaves its slots, closes its listeners (the queue migrates), exits.
"""

from __future__ import annotations

import logging
import os
import pwd
import select
import signal
import sys
import time

from reuseport_standby.client import InstanceClient


def drop_to_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def _complete(data: bytes) -> bool:
    if data.startswith(b"GET"):
        return b"\r\n\r\n" in data
    return data.endswith(b"\n")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    role, service, control = sys.argv[1:4]
    if "--as-nobody" in sys.argv:
        drop_to_nobody()
    client = InstanceClient(role, service, control=control, name="echo")
    listeners = client.open()
    for s in listeners:
        s.setblocking(False)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    if "--no-ready" not in sys.argv:
        client.ready()
    body = f"{role} {os.getpid()}".encode()
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    deadline = time.monotonic() + 600  # bounded: tests never need longer
    while not stopping and time.monotonic() < deadline:
        try:
            ready, _, _ = select.select(listeners, [], [], 0.2)
        except InterruptedError:
            continue
        for lsn in ready:
            try:
                conn, _ = lsn.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    data = b""
                    while not _complete(data):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(reply)
                except OSError:
                    pass
    client.stop()
    for s in listeners:
        s.close()
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
