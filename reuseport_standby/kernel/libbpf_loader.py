"""The default loader: the packaged, precompiled object through libbpf.

libbpf opens the object with its maps pinned by name under the pin
directory (re-using pins that exist) and loads the program with the
expected attach type.  It returns raw fds; :class:`~.group.Group` wraps them.
When the verifier says no, the error carries its conclusion.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from . import libbpf as _libbpf
from ..errors import BpfUnavailable, IncompatiblePins, PermissionProblem
from .pins import MAP_NAMES, PROG_NAME


def packaged_object() -> Path:
    """Path of the BPF object shipped inside the package."""
    return Path(str(resources.files("reuseport_standby") / "_bpf" / "standby.bpf.o"))


def kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


@contextlib.contextmanager
def _opened(lib: _libbpf.LibBpf, obj_path: str, pin_dir: Path, migrate: bool, logbuf: ctypes.Array,
            log_level: int = 0) -> Iterator[tuple[int, int]]:
    """The object opened with maps pinned by name under ``pin_dir``, its program's attach type set: (obj, prog)."""
    try:
        obj = lib.open_object(obj_path, str(pin_dir), logbuf, log_level=log_level)
    except OSError as exc:
        raise BpfUnavailable(f"cannot open BPF object {obj_path}: {exc.strerror}", see=_LOAD) from exc
    try:
        prog = lib.lib.bpf_object__find_program_by_name(obj, PROG_NAME.encode())
        if not prog:
            raise BpfUnavailable(f"{obj_path} has no program named {PROG_NAME}", see=_LOAD)
        attach = _libbpf.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else _libbpf.BPF_SK_REUSEPORT_SELECT
        lib.check(lib.lib.bpf_program__set_expected_attach_type(prog, attach), "set attach type")
        yield obj, prog
    finally:
        lib.lib.bpf_object__close(obj)


def load(lib: _libbpf.LibBpf, obj_path: str, pin_dir: Path, migrate: bool) -> tuple[int, dict[str, int]]:
    """Open and load the object with maps pinned by name under ``pin_dir``."""
    logbuf = ctypes.create_string_buffer(_LOG_SIZE)
    with _opened(lib, obj_path, pin_dir, migrate, logbuf) as (obj, prog):
        rc = lib.lib.bpf_object__load(obj)
        if rc < 0:
            verifier_log = logbuf.value.decode(errors="replace")
            if -rc == errno.ENOSPC and kernel_version() < (6, 4):
                # The log kept its start, not the conclusion (6.4+ keeps the end).
                verifier_log = _errors_only_log(lib, obj_path, pin_dir, migrate) or verifier_log
            raise _load_error(-rc, obj_path, pin_dir, verifier_log)
        prog_fd = os.dup(lib.check(lib.lib.bpf_program__fd(prog), "program fd"))
        map_fds = {}
        for name in MAP_NAMES:
            m = lib.lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m:
                raise BpfUnavailable(f"{obj_path} has no map named {name}", see=_LOAD)
            map_fds[name] = os.dup(lib.check(lib.lib.bpf_map__fd(m), f"{name} fd"))
        return prog_fd, map_fds


_LOAD = "the-program-does-not-load"  # the troubleshooting section of a failed load
_LOG_SIZE = 64 * 1024  # 6.4+ keep the end of a longer log; before, the errors-only retry below


def _errors_only_log(lib: _libbpf.LibBpf, obj_path: str, pin_dir: Path, migrate: bool) -> str:
    """Load once more, logging only the verifier's errors, after the full log overflowed."""
    logbuf = ctypes.create_string_buffer(_LOG_SIZE)
    try:
        with _opened(lib, obj_path, pin_dir, migrate, logbuf, log_level=_libbpf.BPF_LOG_STATS) as (obj, _):
            lib.lib.bpf_object__load(obj)
    except (OSError, BpfUnavailable):
        return ""
    return logbuf.value.decode(errors="replace")


def _load_error(err: int, obj_path: str, pin_dir: Path, verifier_log: str) -> Exception:
    if err == errno.EPERM:
        return PermissionProblem(
            "the kernel refused to load the BPF program (EPERM): the supervisor needs CAP_BPF and "
            "nothing more (run it as root, or give its systemd unit AmbientCapabilities=CAP_BPF), "
            "and the locked-memory limit may need raising (LimitMEMLOCK=infinity) on "
            "kernels before 5.11")
    if err in (errno.EACCES, errno.E2BIG, errno.ENOSPC) and verifier_log.strip():
        return BpfUnavailable(f"the kernel's verifier rejected {obj_path} ({os.strerror(err)}); its last lines:\n"
                              f"{verifier_tail(verifier_log)}\n{_privilege_hint()}", see=_LOAD)
    if err == errno.EINVAL and any((pin_dir / n).exists() for n in MAP_NAMES):
        return IncompatiblePins(
            f"the maps pinned at {pin_dir} do not match this version's program ({os.strerror(err)}); "
            f"stop this service's instances and supervisor, remove {pin_dir}, and start again")
    if err == errno.EINVAL and kernel_version() < (4, 19):
        return BpfUnavailable(f"kernel {platform.release()} has no REUSEPORT_SOCKARRAY (needs 4.19+; 5.14+ for migration)",
                              see="kernel-older-than-514")
    detail = f"; the verifier's last lines:\n{verifier_tail(verifier_log)}" if verifier_log.strip() else ""
    return BpfUnavailable(f"loading {obj_path} failed: {os.strerror(err)}{detail}", see=_LOAD)


def verifier_tail(verifier_log: str, lines: int = 25) -> str:
    """The verifier's conclusion is at the end of its log; keep that part."""
    kept = [line for line in verifier_log.strip().splitlines() if line.strip()]
    return "\n".join("  " + line for line in kept[-lines:])


def _privilege_hint() -> str:
    """Which of the two privilege levels the verifier applied: it verifies more strictly without CAP_PERFMON."""
    caps = _effective_caps()
    if caps is None or caps >> _CAP_PERFMON & 1 or caps >> _CAP_SYS_ADMIN & 1:
        return "(verified with CAP_PERFMON: report this as a bug with the lines above)"
    return ("(verified without CAP_PERFMON, so with the verifier's Spectre v1 checks; this version's program is "
            "meant to pass them: report this as a bug with the lines above, and meanwhile add CAP_PERFMON)")


_CAP_SYS_ADMIN, _CAP_PERFMON = 21, 38


def _effective_caps() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None
