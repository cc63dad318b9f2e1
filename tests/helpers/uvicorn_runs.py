"""uvicorn instances a test starts (killed with their workers at the end), and the app configurations tried."""

from __future__ import annotations

import signal

from .procs import SupervisorProc, stop_process_group
from .servers import InstanceProc, uvicorn_instance

QUIET = ("--no-access-log",)
CONFIGS = {
    "w1": ("asgi_role:app",),
    "w1-factory": ("asgi_role:create_app", "--factory"),
    "w2": ("asgi_role:app", "--workers", "2"),
    "w2-factory": ("asgi_role:create_app", "--factory", "--workers", "2"),
}


class Instances:
    """The instances a test starts; whatever still runs at the end is killed with its workers."""

    def __init__(self) -> None:
        self.started: list[InstanceProc] = []

    def track(self, inst: InstanceProc) -> InstanceProc:
        self.started.append(inst)
        return inst

    def uvicorn(self, sup: SupervisorProc, role: str, app: str, *options: str,
                env: dict[str, str] | None = None) -> InstanceProc:
        return self.track(uvicorn_instance(sup, role, app, *QUIET, *options, env=env))

    def kill_all(self) -> None:
        for inst in self.started:
            if inst.proc is not None:
                stop_process_group(inst.proc, signal.SIGKILL, 5)
