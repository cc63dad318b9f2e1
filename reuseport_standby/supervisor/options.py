"""How one supervisor is configured: the one object the CLI, ``run``, the tests and the benchmarks
build a ``supervise`` command line from, so that they cannot disagree on a flag."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import Any

from .. import protocol
from ..kernel.group import LOADERS
from ..kernel.pins import DEFAULT_PIN_ROOT
from ..kernel.sockets import DEFAULT_BACKLOG, Address
from .health import ON_HANG

#: control connections one uid (root excepted) may hold: worker scope needs 2 roles x 2 instances x
#: (1 + 16 workers) = 68 during a rolling reload, plus operators' commands
MAX_CONNECTIONS_PER_UID = 128


@dataclass(frozen=True)
class SuperviseOptions:
    """Everything ``reuseport-standby supervise`` takes, with its defaults."""

    service: str
    binds: tuple[Address, ...]
    control: str | None = None
    backlog: int = DEFAULT_BACKLOG
    group: str | None = None
    #: members may send operator commands (weight, promote, drain, undrain); root and our own user always may
    admin_group: str | None = None
    pin_root: str = DEFAULT_PIN_ROOT
    #: None: select-or-migrate where the kernel has it (5.14+); False: plain select (comparisons only)
    migrate: bool | None = None
    mount_bpffs: bool = False
    stall_timeout: float = 2.0
    on_hang: str = "demote"
    loader: str = "libbpf"
    bpf_source: str | None = None
    max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID
    metrics: Address | None = None
    #: more command-line arguments, passed as they are (tests of the CLI itself)
    extra: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "binds", tuple(Address.parse(b) if isinstance(b, str) else b for b in self.binds))
        object.__setattr__(self, "pin_root", str(self.pin_root))
        object.__setattr__(self, "extra", tuple(self.extra))

    def check(self) -> "SuperviseOptions":
        """Refuse what cannot work, in the words of the command line."""
        protocol.check_service(self.service)
        if not self.binds:
            raise ValueError("a service needs at least one --bind address")
        if len(set(self.binds)) != len(self.binds):
            raise ValueError("the same address is given twice")
        if self.on_hang not in ON_HANG:
            raise ValueError(f"--on-hang must be one of {', '.join(ON_HANG)}")
        if self.stall_timeout < 0:
            raise ValueError("--stall-timeout must be >= 0 (0 turns stall detection off)")
        if self.max_connections_per_uid < 1:
            raise ValueError("--max-connections-per-uid must be at least 1")
        if self.loader not in LOADERS:
            raise ValueError(f"--loader must be one of {', '.join(LOADERS)}")
        if self.admin_group is not None:
            if self.group is None:
                raise ValueError("--admin-group needs --group: without it only root reaches the control socket, "
                                 "and root may send operator commands anyway")
            from .peers import resolve_group

            resolve_group(self.admin_group, "--admin-group")
        if self.bpf_source and self.loader != "bcc":
            raise ValueError("a BPF source file is compiled by the BCC loader: add --loader bcc")
        return self

    @property
    def control_path(self) -> str:
        return protocol.control_path(self.service, self.control)

    def argv(self) -> list[str]:
        """The ``supervise`` arguments that say these options (defaults left out)."""
        args = ["supervise", "--service", self.service]
        for b in self.binds:
            args += ["--bind", str(b)]
        defaults = {f.name: f.default for f in fields(self)}

        def changed(name: str) -> bool:
            return getattr(self, name) != defaults[name]

        for name, flag in (("control", "--control"), ("backlog", "--backlog"), ("group", "--group"),
                           ("admin_group", "--admin-group"),
                           ("pin_root", "--pin-root"), ("stall_timeout", "--stall-timeout"), ("on_hang", "--on-hang"),
                           ("loader", "--loader"), ("bpf_source", "--bpf-source"),
                           ("max_connections_per_uid", "--max-connections-per-uid"), ("metrics", "--metrics")):
            if changed(name):
                args += [flag, str(getattr(self, name))]
        if self.migrate is False:
            args.append("--no-migrate")
        if self.mount_bpffs:
            args.append("--mount-bpffs")
        return args + list(self.extra)

    def command(self, python: str = sys.executable) -> list[str]:
        """A command line that runs this supervisor."""
        return [python, "-m", "reuseport_standby", *self.argv()]

    @classmethod
    def from_args(cls, args: Any) -> "SuperviseOptions":
        """From the ``supervise`` subcommand's parsed arguments."""
        per_uid = args.max_connections_per_uid
        return cls(service=args.service, binds=tuple(args.bind), control=args.control, backlog=args.backlog,
                   group=args.group, admin_group=args.admin_group, pin_root=args.pin_root,
                   migrate=False if args.no_migrate else None,
                   mount_bpffs=args.mount_bpffs, stall_timeout=args.stall_timeout, on_hang=args.on_hang,
                   loader=args.loader, bpf_source=args.bpf_source,
                   max_connections_per_uid=MAX_CONNECTIONS_PER_UID if per_uid is None else per_uid,
                   metrics=args.metrics).check()
