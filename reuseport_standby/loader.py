"""Load, pin and re-adopt the selection program and its maps.

One *group* is one listening address (one kernel reuseport group).  Each
group gets its own copy of the program and maps, pinned under
``<pin_root>/<service>/<address>/``, so slots of different addresses can
never be confused (the kernel refuses to select a socket of another group).

Pinned maps outlive every process: a restarted supervisor re-opens them
and finds the slots exactly as the kernel kept them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import libbpf as _libbpf
from .errors import BpfUnavailable, IncompatiblePins, PermissionProblem
from .layout import CONFIG_SIZE, LAYOUT_VERSION, NR_SLOTS, Config, Counter

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = "/sys/fs/bpf/reuseport_standby"
BPFFS_MAGIC = 0xCAFE4A11
SO_ATTACH_REUSEPORT_EBPF = 52
SO_COOKIE = 57
PROG_NAME = "rs_select_or_migrate"
MAP_NAMES = ("rs_slots", "rs_config", "rs_counters", "rs_slot_hits")
MIGRATE_MIN_KERNEL = (5, 14)
LOADERS = ("libbpf", "bcc")


def packaged_object() -> Path:
    """Path of the BPF object shipped inside the package."""
    return Path(str(resources.files("reuseport_standby") / "_bpf" / "standby.bpf.o"))


def kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def socket_cookie(sock: socket.socket | int) -> int:
    """The kernel's stable identity of a socket, as a sockarray lookup reports it."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    finally:
        if s is not sock:
            s.close()


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


@dataclass(frozen=True)
class Counters:
    """Sum over CPUs of the program's counters."""

    values: dict[Counter, int]

    def __getitem__(self, key: Counter) -> int:
        return self.values[key]

    def as_dict(self) -> dict[str, int]:
        return {c.name.lower(): v for c, v in self.values.items()}


class Group:
    """The program and maps of one reuseport group (one address), pinned.

    Holds fds to the program and maps, never to any listening socket.
    """

    def __init__(self, pin_dir: Path, prog_fd: int, map_fds: dict[str, int], migrate: bool, lib: _libbpf.LibBpf) -> None:
        self.pin_dir = pin_dir
        self.prog_fd = prog_fd
        self._fds = map_fds
        self.migrate = migrate
        self._lib = lib
        self._ncpus = _possible_cpus()

    # -- opening ------------------------------------------------------------
    @classmethod
    def open(cls, pin_dir: str | os.PathLike[str], *, migrate: bool | None = None, obj_path: str | os.PathLike[str] | None = None,
             mount_bpffs: bool = False, loader: str = "libbpf", bpf_source: str | os.PathLike[str] | None = None) -> "Group":
        """Load the packaged program, reuse or create the pinned maps, pin the program.

        ``migrate=None`` picks SELECT_OR_MIGRATE where the kernel has it
        (5.14+) and degrades to SELECT with a warning elsewhere;
        ``migrate=False`` forces plain SELECT (the published demo design, kept
        for comparisons).  ``loader="bcc"`` compiles the C source (or
        ``bpf_source``) with BCC instead of loading the packaged object.
        """
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}: expected one of {', '.join(LOADERS)}")
        if bpf_source and loader != "bcc":
            raise ValueError("a BPF source file is compiled by the BCC loader: add --loader bcc")
        if migrate is None:
            migrate = kernel_version() >= MIGRATE_MIN_KERNEL
            if not migrate:
                log.warning(
                    "kernel %s is older than 5.14: no listener migration; queued connections of a closing "
                    "instance will be reset. Upgrade the kernel for lossless restarts.", platform.release())
        if loader == "bcc":
            from . import bcc_loader

            return bcc_loader.load(pin_dir, migrate=migrate, source=bpf_source, mount_bpffs=mount_bpffs)
        lib = _libbpf.load()
        pin_dir = Path(pin_dir)
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
        obj_path = str(obj_path or packaged_object())
        prog_fd, map_fds = _load(lib, obj_path, pin_dir, migrate)
        group = cls(pin_dir, prog_fd, map_fds, migrate, lib)
        group._check_layout()
        group._pin_program()
        return group

    @classmethod
    def adopt(cls, pin_dir: str | os.PathLike[str]) -> "Group":
        """Open what is pinned at ``pin_dir`` without loading anything (for ``status``)."""
        lib = _libbpf.load()
        pin_dir = Path(pin_dir)
        fds: dict[str, int] = {}

        def get(path: Path) -> int:
            try:
                return lib.obj_get(str(path))
            except PermissionError:
                return lib.obj_get_readonly(str(path))  # a member of the pins' group

        try:
            for name in MAP_NAMES:
                fds[name] = get(pin_dir / name)
            for migrate in (True, False):
                path = pin_dir / prog_pin_name(migrate)
                if path.exists():
                    try:
                        return cls(pin_dir, get(path), fds, migrate, lib)
                    except PermissionError:
                        return cls(pin_dir, -1, fds, migrate, lib)
            return cls(pin_dir, -1, fds, True, lib)
        except OSError as exc:
            for fd in fds.values():
                os.close(fd)
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionProblem(f"no permission to read the pins at {pin_dir}: run as root, or ask the supervisor over its control socket") from exc
            raise

    def share_read_only(self, gid: int) -> None:
        """Let members of ``gid`` read the pins (status, metrics) without CAP_BPF; writes stay root's."""
        for path in [self.pin_dir.parent, self.pin_dir, *self.pin_dir.iterdir()]:
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise PermissionProblem(
                    f"cannot give the pins at {path} to gid {gid}: without CAP_CHOWN the supervisor can only hand "
                    f"files to a group it belongs to (systemd: SupplementaryGroups=; Kubernetes: fsGroup)") from None
            os.chmod(path, 0o750 if path.is_dir() else 0o640)
        # The pin root above the service (ours, e.g. /sys/fs/bpf/reuseport_standby) was created under
        # the supervisor's umask (0077 in the systemd unit): members need to pass through it.
        root = self.pin_dir.parent.parent
        st = root.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o011 != 0o011:
            try:
                os.chmod(root, st.st_mode & 0o7777 | 0o011)
            except OSError as exc:  # e.g. read-only outside this service's directory (the systemd unit)
                log.warning("members of gid %d cannot pass through %s (%s): they will not read the pins "
                            "while the supervisor is down", gid, root, exc.strerror)

    def _check_layout(self) -> None:
        info = self._lib.map_info(self._fds["rs_slots"])
        cfg = self.read_config_raw()
        if info.max_entries != NR_SLOTS or (cfg.layout_version not in (0, LAYOUT_VERSION)):
            raise IncompatiblePins(
                f"the maps pinned at {self.pin_dir} have another layout (slots={info.max_entries}, "
                f"version={cfg.layout_version}); stop this service's instances and supervisor, remove "
                f"{self.pin_dir} and start again")
        if cfg.layout_version == 0:
            self.write_config(Config())

    def _pin_program(self) -> None:
        """Pin our program, replacing a pinned one whose tag (code) differs.

        The tag does not cover the expected attach type, so the pin's name
        does: ``prog_migrate`` or ``prog_select``.
        """
        path = self.pin_dir / prog_pin_name(self.migrate)
        other = self.pin_dir / prog_pin_name(not self.migrate)
        if other.exists():
            other.unlink()
            self.replaced_program = True
        new_tag = self.prog_tag
        try:
            old_fd = self._lib.obj_get(str(path))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self._lib.obj_pin(self.prog_fd, str(path))
            return
        old_tag = bytes(self._lib.prog_info(old_fd).tag).hex()
        if old_tag == new_tag:
            os.close(self.prog_fd)
            self.prog_fd = old_fd
            return
        os.close(old_fd)
        path.unlink()
        self._lib.obj_pin(self.prog_fd, str(path))
        self.replaced_program = True
        log.info("pinned program at %s had tag %s; replaced by %s", path, old_tag, new_tag)

    #: True when opening replaced a pinned program of other code or attach type.
    replaced_program = False

    def close(self) -> None:
        for fd in [self.prog_fd, *self._fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._fds = {}
        self.prog_fd = -1

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- program --------------------------------------------------------------
    @property
    def prog_info(self) -> _libbpf.ProgInfo:
        return self._lib.prog_info(self.prog_fd)

    @property
    def map_ids(self) -> dict[str, int]:
        return {name: self._lib.map_info(fd).id for name, fd in self._fds.items()}

    @property
    def prog_tag(self) -> str:
        return bytes(self.prog_info.tag).hex()

    def attach(self, sock: socket.socket) -> None:
        """Attach the program to the group of a listening socket.

        Must be called on a socket that already listens: attaching before
        listen() would make the socket a group of its own.
        """
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", self.prog_fd))

    # -- slots ------------------------------------------------------------------
    def set_slot(self, index: int, sock: socket.socket | int) -> None:
        """Put a listening socket into a slot; refuses to overwrite a live one."""
        fd = sock.fileno() if isinstance(sock, socket.socket) else sock
        key = ctypes.c_uint32(index)
        val = ctypes.c_uint64(fd)
        self._lib.check(self._lib.lib.bpf_map_update_elem(self._fds["rs_slots"], ctypes.byref(key), ctypes.byref(val), _libbpf.BPF_NOEXIST),
                        f"put socket into slot {index}")

    def slot_cookie(self, index: int) -> int | None:
        key = ctypes.c_uint32(index)
        val = ctypes.c_uint64(0)
        rc = self._lib.lib.bpf_map_lookup_elem(self._fds["rs_slots"], ctypes.byref(key), ctypes.byref(val))
        if rc == -errno.ENOENT:
            return None
        self._lib.check(rc, f"read slot {index}")
        return val.value

    def clear_slot(self, index: int, expect_cookie: int | None = None) -> bool:
        """Empty a slot; with ``expect_cookie``, only if it still holds that socket.

        The cookie check keeps an old instance's late goodbye from emptying
        the slot its successor already took.
        """
        if expect_cookie is not None and self.slot_cookie(index) != expect_cookie:
            return False
        key = ctypes.c_uint32(index)
        rc = self._lib.lib.bpf_map_delete_elem(self._fds["rs_slots"], ctypes.byref(key))
        if rc == -errno.ENOENT:
            return False
        self._lib.check(rc, f"clear slot {index}")
        return True

    def slots(self) -> dict[int, int]:
        """Occupied slots and the cookie of the socket each holds."""
        out = {}
        for i in range(NR_SLOTS):
            cookie = self.slot_cookie(i)
            if cookie is not None:
                out[i] = cookie
        return out

    # -- config -------------------------------------------------------------------
    def read_config_raw(self) -> Config:
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(CONFIG_SIZE)
        self._lib.check(self._lib.lib.bpf_map_lookup_elem(self._fds["rs_config"], ctypes.byref(key), buf), "read config")
        return Config.unpack(buf.raw)

    def read_config(self) -> Config:
        return self.read_config_raw()

    def write_config(self, config: Config) -> None:
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(config.pack(), CONFIG_SIZE)
        self._lib.check(self._lib.lib.bpf_map_update_elem(self._fds["rs_config"], ctypes.byref(key), buf, _libbpf.BPF_ANY), "write config")

    # -- counters -------------------------------------------------------------------
    def counters(self) -> Counters:
        per_cpu = (ctypes.c_uint64 * self._ncpus)()
        values = {}
        for c in Counter:
            key = ctypes.c_uint32(int(c))
            self._lib.check(self._lib.lib.bpf_map_lookup_elem(self._fds["rs_counters"], ctypes.byref(key), per_cpu), "read counters")
            values[c] = sum(per_cpu)
        return Counters(values)

    def slot_hits(self, indices: "list[int] | range") -> dict[int, int]:
        """Connections handed to each of these slots so far (new and migrated)."""
        per_cpu = (ctypes.c_uint64 * self._ncpus)()
        out = {}
        for i in indices:
            key = ctypes.c_uint32(i)
            self._lib.check(self._lib.lib.bpf_map_lookup_elem(self._fds["rs_slot_hits"], ctypes.byref(key), per_cpu), "read slot hits")
            out[i] = sum(per_cpu)
        return out

    def reset_counters(self) -> None:
        zero = (ctypes.c_uint64 * self._ncpus)()
        for c in Counter:
            key = ctypes.c_uint32(int(c))
            self._lib.check(self._lib.lib.bpf_map_update_elem(self._fds["rs_counters"], ctypes.byref(key), zero, _libbpf.BPF_ANY), "reset counters")


def _possible_cpus() -> int:
    """Per-CPU map values have one entry per *possible* CPU, not online one."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def prog_pin_name(migrate: bool) -> str:
    return "prog_migrate" if migrate else "prog_select"


@contextlib.contextmanager
def _opened(lib: _libbpf.LibBpf, obj_path: str, pin_dir: Path, migrate: bool, logbuf: ctypes.Array,
            log_level: int = 0) -> Iterator[tuple[int, int]]:
    """The object opened with maps pinned by name under ``pin_dir``, its program's attach type set: (obj, prog)."""
    try:
        obj = lib.open_object(obj_path, str(pin_dir), logbuf, log_level=log_level)
    except OSError as exc:
        raise BpfUnavailable(f"cannot open BPF object {obj_path}: {exc.strerror}") from exc
    try:
        prog = lib.lib.bpf_object__find_program_by_name(obj, PROG_NAME.encode())
        if not prog:
            raise BpfUnavailable(f"{obj_path} has no program named {PROG_NAME}")
        attach = _libbpf.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else _libbpf.BPF_SK_REUSEPORT_SELECT
        lib.check(lib.lib.bpf_program__set_expected_attach_type(prog, attach), "set attach type")
        yield obj, prog
    finally:
        lib.lib.bpf_object__close(obj)


def _load(lib: _libbpf.LibBpf, obj_path: str, pin_dir: Path, migrate: bool) -> tuple[int, dict[str, int]]:
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
                raise BpfUnavailable(f"{obj_path} has no map named {name}")
            map_fds[name] = os.dup(lib.check(lib.lib.bpf_map__fd(m), f"{name} fd"))
        return prog_fd, map_fds


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
                              f"{verifier_tail(verifier_log)}\n{_privilege_hint()}")
    if err == errno.EINVAL and any((pin_dir / n).exists() for n in MAP_NAMES):
        return IncompatiblePins(
            f"the maps pinned at {pin_dir} do not match this version's program ({os.strerror(err)}); "
            f"stop this service's instances and supervisor, remove {pin_dir}, and start again")
    if err == errno.EINVAL and kernel_version() < (4, 19):
        return BpfUnavailable(f"kernel {platform.release()} has no REUSEPORT_SOCKARRAY (needs 4.19+; 5.14+ for migration)")
    detail = f"; the verifier's last lines:\n{verifier_tail(verifier_log)}" if verifier_log.strip() else ""
    return BpfUnavailable(f"loading {obj_path} failed: {os.strerror(err)}{detail}")


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
