"""uvicorn instances a test starts (killed with their workers at the end), and the app configurations tried."""

from __future__ import annotations

import re
import shlex
import signal
import time
from pathlib import Path

from reuseport_standby.kernel.sockets import Address
from reuseport_standby.loadgen import Load, LoadResult

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


def readme_commands(readme: Path) -> dict[str, list[str]]:
    """The ``reuseport-standby uvicorn`` command of each role, as an example's README shows it."""
    found = {}
    for line in readme.read_text().splitlines():
        m = re.fullmatch(r"\s*(reuseport-standby uvicorn --role (primary|standby) .+)", line)
        if m:
            found[m.group(2)] = shlex.split(m.group(1))
    assert set(found) == {"primary", "standby"}, f"{readme} lacks a primary or a standby command"
    return found


def restart_example(sup: SupervisorProc, instances: Instances, directory: Path, concurrency: int) -> LoadResult:
    """An example run with its README's commands: SIGTERM the primary, the standby, the primary again
    under load, each replaced once the new one is active; what the clients saw."""
    commands = readme_commands(directory / "README.md")
    address = Address.parse(sup.binds[0])
    env = {"WARMUP_SECONDS": "1"}  # the READMEs' 3 s, shortened to keep the suite quick

    def start(role: str) -> InstanceProc:
        return instances.track(InstanceProc(commands[role], sup, role, env=env, cwd=directory)).start()

    running = {role: start(role).wait_active() for role in ("standby", "primary")}
    with Load(address.host, address.port, concurrency=concurrency, duration=90) as load:
        time.sleep(0.3)
        for role in ("primary", "standby", "primary"):
            running[role].stop(signal.SIGTERM)
            running[role] = start(role).wait_active()
            time.sleep(0.3)
    return load.result
