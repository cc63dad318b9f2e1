"""Forbid, inside an instance, the socket options that steer a reuseport group.

The supervisor locks every listener it hands out (SO_LOCK_FILTER), which
stops attaching a program; the kernel does not let the lock stop
``SO_DETACH_REUSEPORT_BPF``.  An app that is compromised could detach the
group's program in a loop through the listener it serves on (docs/security.md,
"Program integrity").  A seccomp filter, installed by the integrations
before the app is imported, makes ``setsockopt(SOL_SOCKET, ...)`` of the
three reuseport program options fail with EPERM in the instance and in
every process it starts; nothing else is filtered.

The supervisor does not rely on it (a group member need not run our
integrations): it is one more wall around the app we run.  Opt out with
``REUSEPORT_STANDBY_SECCOMP=off``.  The filter needs no privilege but
requires no_new_privs (set here, as systemd's NoNewPrivileges= does):
after it, exec() of a setuid program no longer gains privileges.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct

from ..names import ENV_SECCOMP

log = logging.getLogger(__name__)

SOL_SOCKET = 1
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
FORBIDDEN = (SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF)

PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little-endian hosts)
OFF_NR, OFF_ARCH = 0, 4
OFF_LEVEL, OFF_OPTNAME = 16 + 8 * 1, 16 + 8 * 2

X32_BIT = 0x40000000


class Abi:
    """One system-call ABI a process of this machine can use: its audit arch and numbers."""

    def __init__(self, arch: int, setsockopt: tuple[int, ...], deny_all: tuple[int, ...] = ()) -> None:
        self.arch = arch
        self.setsockopt = setsockopt  # numbers whose (level, optname) arguments are checked
        self.deny_all = deny_all      # numbers refused outright (socketcall: its arguments are behind a pointer)


#: per machine: the native ABI first, then the compat ones the kernel may also accept
ABIS: dict[str, tuple[Abi, ...]] = {
    "x86_64": (Abi(0xC000003E, (54, X32_BIT | 541)),              # x86_64 (and x32, same audit arch)
               Abi(0x40000003, (366,), deny_all=(102,))),          # i386: setsockopt, socketcall
    "aarch64": (Abi(0xC00000B7, (208,)),
                Abi(0x40000028, (294,))),                          # arm (compat)
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(abis: tuple[Abi, ...]) -> bytes:
    """The filter as classic BPF: one block per ABI; labels resolved in a second pass (every jump is
    forward, as classic BPF requires)."""
    code: list[tuple[int, int, str | int, str | int]] = []  # (opcode, k, jt, jf): targets are labels or 0
    labels: dict[str, int] = {}

    def emit(op: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        code.append((op, k, jt, jf))

    for n, abi in enumerate(abis):
        nxt = f"abi{n + 1}"
        emit(BPF_LD_W_ABS, OFF_ARCH)
        emit(BPF_JEQ_K, abi.arch, 0, nxt)
        emit(BPF_LD_W_ABS, OFF_NR)
        for nr in abi.deny_all:
            emit(BPF_JEQ_K, nr, "deny", 0)
        for nr in abi.setsockopt:
            emit(BPF_JEQ_K, nr, "args", 0)
        emit(BPF_RET_K, SECCOMP_RET_ALLOW)
        labels[nxt] = len(code)
    emit(BPF_RET_K, SECCOMP_RET_ALLOW)  # an ABI this filter does not know: not ours to judge
    labels["args"] = len(code)
    emit(BPF_LD_W_ABS, OFF_LEVEL)
    emit(BPF_JEQ_K, SOL_SOCKET, 0, "allow")
    emit(BPF_LD_W_ABS, OFF_OPTNAME)
    for opt in FORBIDDEN:
        emit(BPF_JEQ_K, opt, "deny", 0)
    labels["allow"] = len(code)
    emit(BPF_RET_K, SECCOMP_RET_ALLOW)
    labels["deny"] = len(code)
    emit(BPF_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)

    out = []
    for pc, (op, k, jt, jf) in enumerate(code):
        def rel(t: str | int) -> int:
            if isinstance(t, int):
                return t
            off = labels[t] - pc - 1
            assert 0 <= off < 256, (t, off)
            return off
        out.append(_insn(op, rel(jt), rel(jf), k))
    return b"".join(out)


def forbid_group_steering() -> bool:
    """Install the filter in this process (all its threads).  True when installed; False when switched
    off or not possible here (logged: the supervisor's own defences do not depend on it)."""
    if os.environ.get(ENV_SECCOMP, "").lower() in ("0", "off", "no", "false"):
        log.debug("seccomp filter switched off by %s", ENV_SECCOMP)
        return False
    abis = ABIS.get(platform.machine())
    if abis is None:
        log.info("no seccomp filter on %s: the supervisor re-attaches its program every tick", platform.machine())
        return False
    prog = program(abis)
    n = len(prog) // 8
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("=HxxxxxxQ", n, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        log.warning("no seccomp filter: prctl(PR_SET_NO_NEW_PRIVS) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    rc = libc.syscall(ctypes.c_long(_SYS_SECCOMP[platform.machine()]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC), fbuf)
    if rc != 0:
        err = ctypes.get_errno()
        log.warning("no seccomp filter: seccomp() failed: %s", os.strerror(err) if rc < 0 else f"thread {rc} differs")
        return False
    log.debug("seccomp: setsockopt of the reuseport program options is refused in this process")
    return True


_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
