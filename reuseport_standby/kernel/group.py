"""One reuseport group's program and maps, pinned: open, re-adopt, read and write them.

One *group* is one listening address (one kernel reuseport group).  Each
group gets its own copy of the program and maps, pinned under
``<pin_root>/<service>/<address>/``, so slots of different addresses can
never be confused (the kernel refuses to select a socket of another group).

Pinned maps outlive every process: a restarted supervisor re-opens them
and finds the slots exactly as the kernel kept them.  The two loaders
(libbpf, BCC) only produce fds; this module is the one place that wraps them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from . import bcc_loader, libbpf_loader
from . import libbpf as _libbpf
from ..errors import IncompatiblePins, PermissionProblem, see_doc
from .layout import CONFIG_SIZE, LAYOUT_VERSION, NR_SLOTS, Config, Counter
from .libbpf_loader import kernel_version
from .pins import MAP_NAMES, make_pin_dir, prog_pin_name
from .sockets import socket_cookie

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_EBPF = 52
MIGRATE_MIN_KERNEL = (5, 14)
LOADERS = ("libbpf", "bcc")

__all__ = ["Group", "Counters", "socket_cookie", "LOADERS", "MIGRATE_MIN_KERNEL"]


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
                    "instance will be reset. Upgrade the kernel for lossless restarts (%s).", platform.release(),
                    see_doc("kernel-older-than-514"))
        lib = _libbpf.load()
        pin_dir = Path(pin_dir)
        make_pin_dir(pin_dir, mount_bpffs=mount_bpffs)
        if loader == "bcc":
            prog_fd, map_fds = bcc_loader.load(lib, pin_dir, migrate=migrate, source=bpf_source)
        else:
            obj = str(obj_path or libbpf_loader.packaged_object())
            prog_fd, map_fds = libbpf_loader.load(lib, obj, pin_dir, migrate)
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
        """Let members of ``gid`` read the pins (status, metrics) without CAP_BPF; writes stay root's.

        Never through a symbolic link: one is refused, and chown/chmod are told not to follow links.
        Nothing can be swapped in between the check and the change: the directories above were found
        root's and not writable by others when they were opened (``pins.make_pin_dir``)."""
        from stat import S_IMODE, S_ISDIR, S_ISLNK

        def chmod(path: Path, mode: int) -> None:
            try:
                os.chmod(path, mode, follow_symlinks=False)
            except NotImplementedError:  # a libc without fchmodat(AT_SYMLINK_NOFOLLOW): not a link (checked)
                os.chmod(path, mode)

        for path in [self.pin_dir.parent, self.pin_dir, *self.pin_dir.iterdir()]:
            st = os.lstat(path)
            if S_ISLNK(st.st_mode):
                raise PermissionProblem(
                    f"refusing to give {path} to gid {gid}: it is a symbolic link, not one of our pins (someone with "
                    f"write access to {path.parent} put it there); remove it and start again", see="path-refused")
            try:
                os.chown(path, -1, gid, follow_symlinks=False)
            except PermissionError:
                raise PermissionProblem(
                    f"cannot give the pins at {path} to gid {gid}: without CAP_CHOWN the supervisor can only hand "
                    f"files to a group it belongs to (systemd: SupplementaryGroups=; Kubernetes: fsGroup)",
                    see="control-socket-permissions") from None
            chmod(path, 0o750 if S_ISDIR(st.st_mode) else 0o640)
        # The pin root above the service (ours, e.g. /sys/fs/bpf/reuseport_standby) was created under
        # the supervisor's umask (0077 in the systemd unit): members need to pass through it.
        root = self.pin_dir.parent.parent
        st = os.lstat(root)
        if not S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o011 != 0o011:
            try:
                chmod(root, S_IMODE(st.st_mode) | 0o011)
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
