"""Where a group's program and maps are pinned, and the bpf filesystem under them.

Shared by both loaders and by ``status``: a pin directory made by one is
read by the other.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from ..errors import BpfUnavailable, PermissionProblem, ReuseportStandbyError

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = "/sys/fs/bpf/reuseport_standby"
BPFFS_MAGIC = 0xCAFE4A11
PROG_NAME = "rs_select_or_migrate"
MAP_NAMES = ("rs_slots", "rs_config", "rs_counters", "rs_slot_hits")
#: mount data for --mount-bpffs: only root may enter (systemd mounts it so too)
BPFFS_MOUNT_OPTIONS = b"mode=0700"


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
    under = pin_root == bpffs or pin_root.startswith(bpffs + "/")
    if mount and under and _statfs_type(bpffs) != BPFFS_MAGIC:
        libc = ctypes.CDLL(None, use_errno=True)
        # Root's alone (the kernel's default is 1777: anyone could pre-create our pin root in it).
        if libc.mount(b"bpf", bpffs.encode(), b"bpf", 0, BPFFS_MOUNT_OPTIONS) == 0:
            log.info("mounted bpffs at %s (mode 0700)", bpffs)
            return
        err = ctypes.get_errno()
        raise PermissionProblem(f"could not mount bpffs at {bpffs}: {os.strerror(err)}; run 'mount -t bpf bpf {bpffs}' as root",
                                see="bpffs-not-mounted")
    raise BpfUnavailable(
        f"{pin_root} is not on a bpf filesystem, so the program and maps cannot be pinned. "
        f"Mount it: 'mount -t bpf bpf /sys/fs/bpf' (as root; add it to /etc/fstab or use "
        f"systemd's sys-fs-bpf.mount), or pass --mount-bpffs to let the supervisor do it.",
        see="bpffs-not-mounted")


def make_pin_dir(pin_dir: Path, *, mount_bpffs: bool = False, top: Path | None = None, trusted: bool = False) -> None:
    """Check bpffs (mounting it if asked) and create ``pin_dir``; say what to do when it cannot be.

    The path is walked from below ``top`` (default: where bpffs is mounted) down, one ``lstat`` per
    directory, and never through a symbolic link.  A directory it creates (mkdir, which never follows a
    link) is checked at once with :func:`check_trusted_dir`; with ``trusted`` (the supervisor: its pin
    root, service and address directories) every one is, made by us or not: one that an unprivileged
    user could swap or write into would let them redirect what we pin, chown and chmod.
    """
    pin_dir = Path(os.path.abspath(pin_dir))
    if top is None:
        check_bpffs(str(pin_dir), mount=mount_bpffs)
        top = bpffs_mount_point(pin_dir)
    else:
        top = Path(os.path.abspath(top))
    try:
        parts = pin_dir.relative_to(top).parts
    except ValueError:
        raise ValueError(f"{pin_dir} is not below {top}") from None
    path = top
    for n, name in enumerate(parts):
        path = path / name
        leaf = n == len(parts) - 1
        try:
            st = os.lstat(path)
            made = False
        except FileNotFoundError:
            _mkdir(path, 0o700 if leaf else 0o755)
            st, made = os.lstat(path), True
        except PermissionError as exc:
            raise PermissionProblem(f"cannot reach the pin directory {path}: {exc.strerror}; run as root") from exc
        if trusted or made or stat.S_ISLNK(st.st_mode):
            check_trusted_dir(path, st)


def _mkdir(path: Path, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass  # made meanwhile, by whom is checked next
    except PermissionError as exc:
        raise PermissionProblem(f"cannot create pin directory {path}: {exc.strerror}; run as root or give this user write access") from exc
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise PermissionProblem(
            f"cannot create pin directory {path}: {exc.strerror}. Under systemd, the unit must make that "
            f"directory writable: ReadWritePaths=/sys/fs/bpf/reuseport_standby/SERVICE (not /sys/fs/bpf itself, "
            f"which ProtectKernelTunables= keeps read-only; see examples/systemd/)", see="bpffs-not-mounted") from exc


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a pin directory and everything below it, bottom-up (bpffs has no recursive rmdir).

    For tests and benchmarks, whose services end for good; a supervisor never removes its pins."""
    if not os.path.lexists(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(path)


def remove_made(paths: list[Path]) -> None:
    """Remove the pin directories a failed start made (``paths``: top-down, as they were missing) and the
    pins in its address directories; a directory that still holds anything else is left, with all above."""
    for path in reversed(paths):
        try:
            entries = list(os.scandir(path))
            if not any(e.is_dir(follow_symlinks=False) for e in entries):  # an address's pins, or nothing
                for entry in entries:
                    os.unlink(entry.path)  # a pin or a link, never followed
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:  # not empty: someone else's meanwhile, not ours to remove
                log.warning("could not remove %s, made by the failed start: %s", path, exc.strerror)
            return


def bpffs_mount_point(path: Path) -> Path:
    """The first directory of ``path`` (from ``/`` down) that is on bpffs: where bpffs is mounted.

    It must be a mount point reached without a symbolic link of its own: a path that enters bpffs
    through a link (``/tmp/x -> /sys/fs/bpf/y``) would let the link's owner choose where we pin."""
    cur = Path("/")
    for name in Path(os.path.abspath(path)).parts[1:]:
        cur = cur / name
        kind = _statfs_type(str(cur))
        if kind is None:
            break
        if kind == BPFFS_MAGIC:
            if os.path.islink(cur) or not os.path.ismount(cur):
                raise PermissionProblem(
                    f"{cur} leads into bpffs but is not where bpffs is mounted (a symbolic link, or a directory "
                    f"inside it): pass --pin-root as a real path below the bpffs mount (e.g. under /sys/fs/bpf)",
                    see="path-refused")
            return cur
    raise BpfUnavailable(f"{path} is not on a bpf filesystem", see="bpffs-not-mounted")


def check_trusted_dir(path: Path, st: os.stat_result) -> None:
    """Refuse a directory we would pin into (or lock, or hand to --group) that someone else controls.

    A symbolic link could be pointed anywhere; a directory owned by another user, or writable by
    group or others, lets them replace what lies below it between our check and our use.
    """
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link (it could point anywhere)"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid not in (0, euid):
        problem = f"is owned by uid {st.st_uid}, not by root{'' if euid == 0 else f' or uid {euid}'}"
    elif st.st_mode & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[st.st_mode & 0o022]
        problem = f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise PermissionProblem(
        f"refusing the pin directory {path}: it {problem}, so another user could redirect or replace the pins. "
        f"If you did not create it, find out who did; then remove it (the supervisor recreates it, root's, mode "
        f"0700), or make it root's and not writable by others (chown root {path}; chmod go-w {path}), or pass "
        f"another --pin-root", see="path-refused")


class ServiceLocked(ReuseportStandbyError):
    """Another process holds the service's lock: another supervisor of the same service runs."""

    see = "another-supervisor-serves-this-service"

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        self.holder = holder


def lock_service(service_dir: Path, *, mount_bpffs: bool = False, top: Path | None = None) -> int:
    """Create (or check) the service's pin directory and lock it: one supervisor per service.

    ``flock(LOCK_EX | LOCK_NB)`` on the directory itself (bpffs holds no regular files; a directory
    opened read-only takes a flock, on bpffs as anywhere).  Returns the fd: the lock lasts until it is
    closed, or until the process ends, however it ends (SIGKILL too).  Raises :class:`ServiceLocked`
    at once if another process holds it.  ``status`` and the other readers never take it.
    """
    service_dir = Path(os.path.abspath(service_dir))
    make_pin_dir(service_dir, mount_bpffs=mount_bpffs, top=top, trusted=True)
    try:
        fd = os.open(service_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # replaced since it was checked: only root could have
        raise PermissionProblem(f"cannot open the pin directory {service_dir}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        check_trusted_dir(service_dir, st)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(st)
            raise ServiceLocked(f"service {service_dir.name} already has a supervisor"
                                f"{'' if holder is None else f' (pid {holder})'}", holder) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_holder(st: os.stat_result) -> int | None:
    """The pid that took the flock on this inode, from /proc/locks (None: not found)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 7221 00:28:43762 0 EOF" (a blocked waiter has "->" after "1:")
                if "FLOCK" in fields:
                    k = fields.index("FLOCK")
                    if len(fields) > k + 4 and fields[k + 4] == dev and fields[1] != "->":
                        return int(fields[k + 3]) or None  # 0: in a PID namespace we cannot see
    except (OSError, ValueError):
        pass
    return None
