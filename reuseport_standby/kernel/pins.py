"""Where a group's program and maps are pinned, and the bpf filesystem under them.

Shared by both loaders and by ``status``: a pin directory made by one is
read by the other.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

from ..errors import BpfUnavailable, PermissionProblem

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = "/sys/fs/bpf/reuseport_standby"
BPFFS_MAGIC = 0xCAFE4A11
PROG_NAME = "rs_select_or_migrate"
MAP_NAMES = ("rs_slots", "rs_config", "rs_counters", "rs_slot_hits")


def prog_pin_name(migrate: bool) -> str:
    return "prog_migrate" if migrate else "prog_select"


def _statfs_type(path: str) -> int | None:
    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def _exists(path: Path, pin_root: str) -> bool:
    try:
        path.stat()
        return True
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        # systemd mounts /sys/fs/bpf with mode 0700: only root gets past it.
        raise PermissionProblem(
            f"no permission to reach the pin directory {pin_root} ({exc.filename}: {exc.strerror}); the supervisor "
            f"runs as root with CAP_BPF (bpffs is root's, mode 0700 where systemd mounts it); other users ask the "
            f"supervisor over its control socket ('reuseport-standby status')") from None


def check_bpffs(pin_root: str, *, mount: bool = False) -> None:
    """Make sure ``pin_root`` lies on a bpf filesystem, mounting it if asked."""
    probe = Path(pin_root)
    while not _exists(probe, pin_root) and probe != probe.parent:
        probe = probe.parent
    if _statfs_type(str(probe)) == BPFFS_MAGIC:
        return
    bpffs = "/sys/fs/bpf"
    if mount and pin_root.startswith(bpffs) and _statfs_type(bpffs) != BPFFS_MAGIC:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", bpffs.encode(), b"bpf", 0, None) == 0:
            log.info("mounted bpffs at %s", bpffs)
            return
        err = ctypes.get_errno()
        raise PermissionProblem(f"could not mount bpffs at {bpffs}: {os.strerror(err)}; run 'mount -t bpf bpf {bpffs}' as root")
    raise BpfUnavailable(
        f"{pin_root} is not on a bpf filesystem, so the program and maps cannot be pinned. "
        f"Mount it: 'mount -t bpf bpf /sys/fs/bpf' (as root; add it to /etc/fstab or use "
        f"systemd's sys-fs-bpf.mount), or pass --mount-bpffs to let the supervisor do it."
    )


def make_pin_dir(pin_dir: Path, *, mount_bpffs: bool = False) -> None:
    """Check bpffs (mounting it if asked) and create ``pin_dir``; say what to do when it cannot be."""
    check_bpffs(str(pin_dir), mount=mount_bpffs)
    try:
        pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except PermissionError as exc:
        raise PermissionProblem(f"cannot create pin directory {pin_dir}: {exc.strerror}; run as root or give this user write access") from exc
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise PermissionProblem(
            f"cannot create pin directory {pin_dir}: {exc.strerror}. Under systemd, the unit must make that "
            f"directory writable: ReadWritePaths=/sys/fs/bpf/reuseport_standby/SERVICE (not /sys/fs/bpf itself, "
            f"which ProtectKernelTunables= keeps read-only; see examples/systemd/)") from exc
