"""The former selection program (a probe loop over a span of slots), rebuilt from git for a side-by-side run.

The dense live-slot table replaced it in commit 7116e43; its parent is the
last commit with the probe loop.  Its source is taken from git history at
bench time, not kept as a copy: the baseline is then exactly what shipped,
pinned by a commit hash, and no second, dead copy of the program sits in the
tree for readers, linters or the layout test to mistake for the real one.
A checkout without that history (a shallow clone, an sdist) gets one line
saying so, and the benchmark measures the current program alone.
"""

from __future__ import annotations

import ctypes
import platform
import struct
import subprocess
from pathlib import Path

from reuseport_standby.kernel import libbpf, libbpf_loader
from reuseport_standby.kernel.group import Group
from reuseport_standby.kernel.pins import make_pin_dir

#: 7116e43^ ("demo: leave nothing pinned behind", 2026-11-27): the last commit with the probe loop.
FORMER_COMMIT = "6d2e57e5970487c52e02736d855223f2f8b238f8"
FORMER_FILES = ("bpf/standby.bpf.c", "bpf/standby.h")
#: Its ``struct rs_config`` (layout 2): span[2], standby_weight, layout_version, disabled, flags, reserved.
_FORMER_CONFIG = struct.Struct("=IIIIQII")
FORMER_LAYOUT_VERSION = 2


class FormerUnavailable(Exception):
    """The former program cannot be rebuilt here (no git history, no clang)."""


def build(workdir: Path, repo: Path) -> Path:
    """Compile the former program from git history into ``workdir``, with bpf/Makefile's flags."""
    for name in FORMER_FILES:
        try:
            text = subprocess.run(["git", "-C", str(repo), "show", f"{FORMER_COMMIT}:{name}"], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise FormerUnavailable(f"cannot read {name} at commit {FORMER_COMMIT[:7]} from git ({_why(exc)}); "
                                    "a shallow clone lacks it: 'git fetch --unshallow'") from None
        (workdir / Path(name).name).write_text(text)
    obj = workdir / "former.bpf.o"
    cmd = ["clang", "-O2", "-g", "-target", "bpf", "-Wall", f"-I{workdir}",
           f"-I/usr/include/{platform.machine()}-linux-gnu", "-c", str(workdir / "standby.bpf.c"), "-o", str(obj)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FormerUnavailable(f"cannot compile the former program ({_why(exc)}): install clang and libbpf-dev") from None
    return obj


def _why(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or "").strip().splitlines()[-1:][0] if (exc.stderr or "").strip() else f"exit {exc.returncode}"
    return str(exc)


def open_group(obj: Path, pin_dir: Path) -> Group:
    """Load the former object with its maps pinned under ``pin_dir``, as SELECT_OR_MIGRATE.

    Only the layout check and program pin of :meth:`Group.open` are left out (they expect layout 3);
    slots, counters and ``prog_info`` work on its maps as on ours.
    """
    lib = libbpf.load()
    make_pin_dir(pin_dir)
    prog_fd, map_fds = libbpf_loader.load(lib, str(obj), pin_dir, True)
    return Group(pin_dir, prog_fd, map_fds, True, lib)


def write_config(group: Group, spans: tuple[int, int], disabled: int = 0) -> None:
    """The former program's config: the slots [base, base + span) of each range may be live."""
    raw = _FORMER_CONFIG.pack(spans[0], spans[1], 0, FORMER_LAYOUT_VERSION, disabled, 0, 0)
    lib = group._lib
    fd = group._fds["rs_config"]
    if lib.map_info(fd).value_size != len(raw):
        raise FormerUnavailable(f"{group.pin_dir}/rs_config is not the former layout")
    key = ctypes.c_uint32(0)
    buf = ctypes.create_string_buffer(raw, len(raw))
    lib.check(lib.lib.bpf_map_update_elem(fd, ctypes.byref(key), buf, libbpf.BPF_ANY), "write former config")


__all__ = ["FORMER_COMMIT", "FormerUnavailable", "build", "open_group", "write_config"]
