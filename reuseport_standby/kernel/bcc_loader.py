"""The second loader: BCC compiles the same C source at run time.

For users who already run BCC (Debian/Ubuntu ``python3-bpfcc``) and want to
adapt the selection policy in C without a build step.  BCC 0.26 has no
REUSEPORT_SOCKARRAY table type, so the maps are created (or re-opened from
their pins) here, with the same names, shapes and pin paths as the libbpf
loader's, and handed to the program as fds: the C file's ``RS_BCC`` shim
turns ``-DRS_FD_<map>=N`` into ``bpf_pseudo_fd``.  Either loader re-adopts
what the other pinned.

``bcc`` is imported only when this loader is chosen.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

from . import libbpf as _libbpf
from ..errors import BpfUnavailable, IncompatiblePins, PermissionProblem
from .layout import CONFIG_SIZE, NR_COUNTERS, NR_SLOTS
from .pins import MAP_NAMES, PROG_NAME

_BCC = "bcc-module-or-kernel-headers-missing"  # the troubleshooting section of the BCC loader's failures

log = logging.getLogger(__name__)

BPF_PROG_TYPE_SK_REUSEPORT = 21
# name: (map type, key size, value size, max entries) — what bpf/standby.bpf.c declares for libbpf
MAP_SPECS = {
    "rs_slots": (20, 4, 8, NR_SLOTS),        # BPF_MAP_TYPE_REUSEPORT_SOCKARRAY
    "rs_config": (2, 4, CONFIG_SIZE, 1),     # BPF_MAP_TYPE_ARRAY
    "rs_counters": (6, 4, 8, NR_COUNTERS),   # BPF_MAP_TYPE_PERCPU_ARRAY
    "rs_slot_hits": (6, 4, 8, NR_SLOTS),     # BPF_MAP_TYPE_PERCPU_ARRAY
}
SYSTEM_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)


def packaged_source() -> Path:
    return Path(__file__).resolve().parent.parent / "_bpf" / "standby.bpf.c"


def import_bcc() -> ModuleType:
    """``import bcc``, also from the distribution's dist-packages when this Python is a venv or another build."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for d in SYSTEM_DIST_PACKAGES:
        if os.path.isdir(os.path.join(d, "bcc")):
            sys.path.append(d)
            try:
                return importlib.import_module("bcc")
            except ImportError as exc:
                raise BpfUnavailable(f"BCC at {d} does not import in this Python: {exc}", see=_BCC) from exc
            finally:
                sys.path.remove(d)
    raise BpfUnavailable("the BCC loader needs BCC's Python module: 'apt-get install python3-bpfcc' on Debian/Ubuntu "
                         "('dnf install python3-bcc' on Fedora/RHEL), or use the default libbpf loader", see=_BCC)


def headers_problem() -> str | None:
    build = Path("/lib/modules") / platform.release() / "build"
    if (build / "include").is_dir() or (build / "Makefile").exists():
        return None
    return (f"BCC compiles against kernel headers, and {build} is missing. Install them: "
            f"'apt-get install linux-headers-$(uname -r)' (Debian/Ubuntu); where no package matches the running "
            f"kernel, install linux-headers-amd64 and link {build} to /usr/src/linux-headers-*-amd64 and "
            f"{build.parent / 'source'} to /usr/src/linux-headers-*-common (only UAPI and socket types are used)")


def open_maps(lib: _libbpf.LibBpf, pin_dir: Path) -> dict[str, int]:
    """Re-open the pinned maps, or create and pin them, checking their shape either way."""
    fds: dict[str, int] = {}
    try:
        for name in MAP_NAMES:
            mtype, ksize, vsize, entries = MAP_SPECS[name]
            path = pin_dir / name
            if path.exists():
                fd = lib.obj_get(str(path))
                fds[name] = fd
                info = lib.map_info(fd)
                if (info.type, info.key_size, info.value_size, info.max_entries) != (mtype, ksize, vsize, entries):
                    raise IncompatiblePins(
                        f"the map pinned at {path} has another shape; stop this service's instances and "
                        f"supervisor, remove {pin_dir} and start again")
                continue
            fd = lib.lib.bpf_map_create(mtype, name.encode(), ksize, vsize, entries, None)
            if fd < 0:
                if -fd == errno.EPERM:
                    raise PermissionProblem("creating BPF maps needs CAP_BPF (run the supervisor as root)")
                raise _libbpf._oserror(-fd, f"create map {name}")
            fds[name] = fd
            lib.obj_pin(fd, str(path))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """BCC's clang prints diagnostics on fd 2; keep them for the error message."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def load(lib: _libbpf.LibBpf, pin_dir: Path, *, migrate: bool,
         source: str | os.PathLike[str] | None = None) -> tuple[int, dict[str, int]]:
    """Compile ``source`` (default: the packaged C file) with BCC against the pinned maps: (program fd, map fds)."""
    bcc = import_bcc()
    problem = headers_problem()
    if problem:
        raise BpfUnavailable(problem, see=_BCC)
    src = Path(source) if source else packaged_source()
    if not src.is_file():
        raise BpfUnavailable(f"BPF source {src} not found", see=_BCC)
    fds = open_maps(lib, pin_dir)
    include = src.resolve().parent
    cflags = [f"-I{include}", f"-I{packaged_source().resolve().parent}", "-DRS_BCC",
              *[f"-DRS_FD_{name}={fd}" for name, fd in fds.items()]]
    attach = _libbpf.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else _libbpf.BPF_SK_REUSEPORT_SELECT
    try:
        with _capture_stderr() as diagnostics:
            try:
                module = bcc.BPF(src_file=str(src).encode(), cflags=cflags)
                fn = module.load_func(PROG_NAME.encode(), BPF_PROG_TYPE_SK_REUSEPORT, attach_type=attach)
                prog_fd = os.dup(fn.fd)
                module.cleanup()
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
        if failure is not None:
            text = diagnostics[0].strip() if diagnostics else ""
            raise BpfUnavailable(f"BCC could not compile or load {src}: {failure}" + (f"\n{text[-4000:]}" if text else ""),
                                 see=_BCC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    log.debug("BCC loaded %s into %s", src, pin_dir)
    return prog_fd, fds
