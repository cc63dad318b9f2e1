"""The integrations' seccomp filter (kernel/seccomp.py): the app we run cannot steer the port.

The fast tests install the filter in a child process on unprivileged sockets; the end-to-end test
runs a compromised app under gunicorn with our config module, and its contrast with the filter
switched off.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from helpers.echo import host_port
from helpers.procs import REPO
from helpers.servers import APPS, InstanceProc, gunicorn_cmd
from reuseport_standby.kernel import seccomp

CHILD = textwrap.dedent("""
    import ctypes, errno, json, socket, struct, subprocess, sys
    from reuseport_standby.kernel import seccomp

    def listener():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        return s

    def attempt(s, opt, value):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, value)
            return "done"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    insns = (ctypes.c_ubyte * 8)(*struct.pack("=HBBI", 0x06, 0, 0, 0))
    prog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insns))
    installed = seccomp.forbid_group_steering()
    s = listener()
    out = {"installed": installed,
           "attach_cbpf": attempt(s, 51, prog), "detach": attempt(s, 68, 0),
           "reuseaddr": attempt(s, socket.SO_REUSEADDR, 1), "keepalive": attempt(s, socket.SO_KEEPALIVE, 1),
           "tcp_nodelay": "done" if s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) is None else "?"}
    # a process the app starts inherits the filter
    code = ("import socket; s = socket.socket(); s.setsockopt(1, 15, 1); s.bind(('127.0.0.1', 0)); s.listen()\\n"
            "try:\\n    s.setsockopt(1, 68, 0); print('done')\\n"
            "except OSError as e: print(e.errno)")
    out["child_detach"] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    print(json.dumps(out))
""")


def run_child(**env: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.uname().machine not in seccomp.ABIS, reason="no seccomp ABI table for this machine")
def test_filter_refuses_only_the_reuseport_program_options() -> None:
    out = run_child()
    assert out["installed"] is True
    assert out["attach_cbpf"] == "EPERM" and out["detach"] == "EPERM", out
    assert out["reuseaddr"] == out["keepalive"] == out["tcp_nodelay"] == "done", out
    assert out["child_detach"] == "1", out  # EPERM in a process it started


def test_contrast_without_the_filter_the_same_calls_reach_the_kernel() -> None:
    out = run_child(REUSEPORT_STANDBY_SECCOMP="off")
    assert out["installed"] is False
    assert out["attach_cbpf"] == "done", out   # any holder of a reuseport socket may attach a program...
    assert out["detach"] == "done", out        # ...and detach it
    assert out["child_detach"] == "2", out     # ENOENT: nothing attached, but the call reached the kernel


def test_every_jump_of_the_filter_is_forward_and_in_range() -> None:
    for abis in seccomp.ABIS.values():
        prog = seccomp.program(abis)
        assert len(prog) % 8 == 0 and len(prog) // 8 < 4096
        for pc in range(len(prog) // 8):
            code, jt, jf, _ = struct.unpack_from("=HBBI", prog, pc * 8)
            if code == seccomp.BPF_JEQ_K:
                assert pc + 1 + max(jt, jf) < len(prog) // 8


@pytest.mark.parametrize("seccomp_env", ["on", "off"])
def test_a_compromised_gunicorn_app_cannot_detach_the_program(supervisor, seccomp_env: str) -> None:
    """Real gunicorn with our config module, an app that tries to steer the port through its own
    listener: EPERM for attach and detach; with the filter switched off (the contrast), attach is still
    refused by the supervisor's SO_LOCK_FILTER but detach goes through."""
    sup = supervisor()
    env = {"PYTHONPATH": str(APPS), **({"REUSEPORT_STANDBY_SECCOMP": "off"} if seccomp_env == "off" else {})}
    inst = InstanceProc(gunicorn_cmd("steering_app:app", "--workers", "1"), sup, "primary", env=env).start()
    try:
        inst.wait_active()
        host, port = host_port(sup)
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        result = json.loads(data.partition(b"\r\n\r\n")[2])
        print(f"\nseccomp {seccomp_env}: {result}")
        assert result["attach"] and set(result["attach"]) == {"EPERM"}, result  # SO_LOCK_FILTER, either way
        if seccomp_env == "on":
            assert set(result["detach"]) == {"EPERM"}, result
        else:
            assert "done" in result["detach"], result
    finally:
        inst.stop()
