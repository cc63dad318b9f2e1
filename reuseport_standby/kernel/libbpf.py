"""Thin ctypes binding to the system libbpf (``libbpf.so.1``, else ``.so.0``).

Only the handful of calls the loader needs.  libbpf >= 1.0 returns
``-errno`` from its low-level calls and NULL (with errno set) from its
object API; both are turned into ``OSError`` here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import lru_cache

from ..errors import BpfUnavailable

# enum bpf_attach_type values (include/uapi/linux/bpf.h)
BPF_SK_REUSEPORT_SELECT = 39
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_STATS_RUN_TIME = 0
BPF_OBJ_GET = 7
BPF_F_RDONLY = 1 << 3
#: Verifier log level "errors and statistics", without the trace of every
#: instruction: what the loader asks for when the full log overflowed, since
#: kernels before 6.4 keep the *start* of an overflowing log and fail with a
#: bare ENOSPC, which hides the verifier's conclusion at its end.
BPF_LOG_STATS = 4
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}


class _OpenOpts(ctypes.Structure):
    """Prefix of ``struct bpf_object_open_opts``; ``sz`` tells libbpf how much we know."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd_stub", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``run_cnt`` (uapi, stable)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


class MapInfo(ctypes.Structure):
    """``struct bpf_map_info`` prefix (uapi, stable)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class LibBpf:
    """The loaded shared library with typed signatures."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib = lib
        self.path = path
        vp, cp, ci, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sigs = {
            "bpf_object__open_file": (vp, [cp, ctypes.POINTER(_OpenOpts)]),
            "bpf_object__load": (ci, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_program__set_expected_attach_type": (ci, [vp, ci]),
            "bpf_program__fd": (ci, [vp]),
            "bpf_map__fd": (ci, [vp]),
            "bpf_obj_pin": (ci, [ci, cp]),
            "bpf_obj_get": (ci, [cp]),
            "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
            "bpf_map_delete_elem": (ci, [ci, vp]),
            "bpf_obj_get_info_by_fd": (ci, [ci, vp, ctypes.POINTER(u32)]),
            "bpf_enable_stats": (ci, [ci]),
            "bpf_map_create": (ci, [ci, cp, u32, u32, u32, vp]),
            "libbpf_major_version": (u32, []),
            "libbpf_minor_version": (u32, []),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    @property
    def version(self) -> str:
        return f"{self.lib.libbpf_major_version()}.{self.lib.libbpf_minor_version()}"

    # -- object API -------------------------------------------------------
    def open_object(self, path: str, pin_root: str | None, log: ctypes.Array | None, log_level: int = 0) -> int:
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        opts.pin_root_path = pin_root.encode() if pin_root else None
        if log is not None:
            opts.kernel_log_buf = ctypes.cast(log, ctypes.c_char_p)
            opts.kernel_log_size = len(log)
            # 0: no log while it loads; on failure libbpf retries at level 1 into ``log``.
            opts.kernel_log_level = log_level
        obj = self.lib.bpf_object__open_file(path.encode(), ctypes.byref(opts))
        if not obj:
            raise _oserror(ctypes.get_errno() or errno.EINVAL, f"bpf_object__open_file({path})")
        return obj

    # -- fd-level calls ---------------------------------------------------
    def check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise _oserror(-rc, what)
        return rc

    def obj_get(self, path: str) -> int:
        return self.check(self.lib.bpf_obj_get(path.encode()), f"bpf_obj_get({path})")

    def obj_get_readonly(self, path: str) -> int:
        """Open a pin read-only: file read permission suffices (a group-readable pin)."""
        attr = (ctypes.c_uint64 * 2)()
        buf = ctypes.create_string_buffer(path.encode())
        attr[0] = ctypes.addressof(buf)
        attr[1] = BPF_F_RDONLY << 32  # bpf_fd = 0, file_flags = BPF_F_RDONLY
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        nr = _SYS_BPF.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "read-only pin access is not wired up for this architecture")
        fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(BPF_OBJ_GET), attr, ctypes.c_long(16))
        if fd < 0:
            raise _oserror(ctypes.get_errno(), f"bpf_obj_get({path}, read-only)")
        return fd

    def obj_pin(self, fd: int, path: str) -> None:
        self.check(self.lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")

    def prog_info(self, fd: int) -> ProgInfo:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        self.check(self.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
        return info

    def map_info(self, fd: int) -> MapInfo:
        info = MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        self.check(self.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
        return info


def _oserror(err: int, what: str) -> OSError:
    return OSError(err, f"{what}: {os.strerror(err)}")


#: libbpf 1.0 made -errno the only error convention of its low-level calls, which ``check`` relies on;
#: 0.x (Ubuntu 22.04's libbpf0 is 0.5) returns -1 and leaves errno, and lacks bpf_map_create before 0.7.
MIN_VERSION = (1, 0)


@lru_cache(maxsize=1)
def load() -> LibBpf:
    """Open the system libbpf once per process; one too old is refused by name, never half used."""
    candidates = ["libbpf.so.1", "libbpf.so.0"]
    found = ctypes.util.find_library("bpf")
    if found and found not in candidates:
        candidates.append(found)
    errors, old = [], []
    for name in candidates:
        try:
            handle = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        version = _version_of(handle)
        if version is None or version < MIN_VERSION:
            old.append(f"{name} is libbpf {'older than 0.6' if version is None else '%d.%d' % version}")
            continue
        try:
            return LibBpf(handle, name)
        except AttributeError as exc:
            errors.append(f"{name}: {exc}")
    if old:
        raise BpfUnavailable(
            f"the system libbpf is too old ({'; '.join(old)}); 1.0 or later is needed. Install libbpf1: "
            "'apt-get install libbpf1' (Debian 12 has 1.1), 'dnf install libbpf' on Fedora/RHEL",
            see="libbpf-missing-or-too-old")
    raise BpfUnavailable(
        "libbpf was not found (" + "; ".join(errors) + "). Install it: "
        "'apt-get install libbpf1' on Debian/Ubuntu, 'dnf install libbpf' on Fedora/RHEL",
        see="libbpf-missing-or-too-old")


def _version_of(handle: ctypes.CDLL) -> tuple[int, int] | None:
    """(major, minor) of an opened libbpf; None before 0.6, which had no version call."""
    try:
        major, minor = handle.libbpf_major_version, handle.libbpf_minor_version
    except AttributeError:
        return None
    major.restype = minor.restype = ctypes.c_uint32
    return int(major()), int(minor())
