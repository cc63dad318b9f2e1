"""``reuseport-standby run``: a supervisor, a primary and a standby from one command.

The runner starts the supervisor as a child (the only process that needs
privileges), then a primary and a standby copy of the user's server command
with the integration injected (:mod:`reuseport_standby.wrap`), as ``--user``
when given (no capabilities, no supplementary groups but the control
socket's).

One thread owns every child's life: the main loop.  Each turn it reaps
what exited (through pidfds), restarts a crashed instance with backoff,
advances a rolling reload by one step, checks the supervisor (alive *and*
answering ``ping``; restarted with backoff when not, while the instances
keep serving) and stops what overstayed.  A reload is a state machine in
that loop, not a thread of its own, so a crash restart can never race it:
the role a reload is replacing is the reload's, and the reaper only records
the death of its old instance.  The runner is a child subreaper: a worker
whose master died is reparented to it, stopped and reaped; when ``run``
exits, no process it started remains.

A rolling reload (SIGHUP, or ``reuseport-standby reload``) replaces the
standby and then the primary, each by starting the new instance first and
stopping the old one only once the new one is active, so one instance of
each role serves throughout, and a new version that never becomes ready is
rolled back with the old one still serving.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from . import canary, client, protocol
from .children import Orphans, become_subreaper, has_exited, my_children, send
from .errors import ProtocolError, ReuseportStandbyError, SupervisorUnavailable
from .kernel.layout import Role
from .names import ENV_CONTROL, ENV_GENERATION, ENV_HEALTH_PATH, ENV_ROLE, ENV_SERVICE
from .outcomes import Outcomes
from .status import instance_state
from .supervisor.loop import sd_notify
from .supervisor.options import SuperviseOptions
from .run_client import run_socket_path
from .wrap import instance_command

log = logging.getLogger(__name__)

#: seconds a peer of the reload socket has to send its request, and to take each message of the reply
RELOAD_IO_TIMEOUT = 10.0
#: the supervisor is asked ``ping`` this often, with this timeout; after PING_FAILURES misses in a row
#: it is killed and restarted (alive but unreachable: its control socket deleted, or hung)
PING_INTERVAL = 2.0
PING_TIMEOUT = 2.0
PING_FAILURES = 3
#: seconds a (re)started supervisor has to answer ``ping``
SUPERVISOR_START_TIMEOUT = 30.0
#: backoff between failed supervisor restarts: first, doubling, at most
SUPERVISOR_BACKOFF = (0.5, 30.0)
#: seconds the supervisor has to exit after SIGTERM
SUPERVISOR_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class InstanceUser:
    """Who the instances run as: ``setgroups(extra_groups)``, ``setgid(gid)``, ``setuid(uid)``."""

    name: str
    uid: int
    gid: int
    extra_groups: tuple[int, ...] = ()
    home: str = "/"


def resolve_user(user: str, group: str | None) -> InstanceUser | None:
    """``--user``/``--group`` as ids; None for an explicit ``--user root`` (instances keep root's powers).

    The instances get the group as their only group: it is also the group the supervisor lets on its
    control socket, so they need no supplementary group at all."""
    import grp
    import pwd

    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise ValueError(f"unknown user {user!r} for --user") from None
    if pw.pw_uid == 0:
        return None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise ValueError(f"--user {user} needs 'run' to start as root (it starts the supervisor too)")
    missing = missing_user_caps() if pw.pw_uid != os.geteuid() else []
    if missing:
        raise ValueError(f"--user {user} needs {', '.join(missing)} (add them to the unit's CapabilityBoundingSet= "
                         f"and AmbientCapabilities=; the instances keep none of them)")
    if group is None:
        gid = pw.pw_gid
    else:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"unknown group {group!r} for --group") from None
    return InstanceUser(name=pw.pw_name, uid=pw.pw_uid, gid=gid, home=pw.pw_dir or "/")


#: what ``run --user`` needs besides what the supervisor needs: become the user, hand it the composed
#: config, and signal its processes (capability numbers, linux/capability.h)
USER_CAPS = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


def missing_user_caps() -> list[str]:
    """The capabilities ``--user`` needs that this process lacks (a unit's CapabilityBoundingSet= may)."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return []
    return [name for name, bit in USER_CAPS.items() if not eff >> bit & 1]


def group_name(gid: int) -> str:
    """A group's name for the supervisor's --group (its number when it has none)."""
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@dataclass
class RunConfig:
    """``run``: the supervisor to start (its options), the server command, and how long instances get."""

    supervisor: SuperviseOptions
    command: list[str]
    ready_timeout: float = 60.0
    stop_timeout: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)
    user: InstanceUser | None = None
    #: variables of our own options (REUSEPORT_STANDBY_BIND...) that no child inherits (cli.option_variables)
    drop_env: frozenset[str] = frozenset()
    #: --health-path: the instances' workers take traffic only once GET PATH answers 2xx (health_check.py)
    health_path: str | None = None

    @property
    def service(self) -> str:
        return self.supervisor.service


def child_env(drop: frozenset[str] = frozenset()) -> dict[str, str]:
    """Our environment without NOTIFY_SOCKET: under Type=notify, ``run`` tells systemd it is ready (both
    instances serve), not the supervisor nor gunicorn, which would each say so on their own.  Nor ``drop``:
    the variables of ``run``'s own options, which said what ``run`` was told, not what a child is."""
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and k not in drop}


class InstanceFailed(ReuseportStandbyError):
    """A new instance exited or did not become ready in time."""

    see = "an-instance-does-not-become-ready"
    #: what the reply to ``reload`` carries besides the message (a canary's verdicts)
    reply_fields: dict[str, Any] = {}


class CanaryRolledBack(InstanceFailed):
    """The new version failed a canary step (or could not be judged): it was stopped, the old one serves on."""

    see = "a-canary-reload-rolled-back"

    def __init__(self, message: str, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.reply_fields = fields


@dataclass
class ReloadOptions:
    """What one ``reload`` asked for besides the rolling restart itself."""

    canary: canary.CanaryPlan | None = None
    health_path: str | None = None


@dataclass
class Managed:
    """One instance's master process, held through a pidfd until it is reaped."""

    role: Role
    proc: subprocess.Popen
    pidfd: int
    started: float
    generation: int
    #: SIGTERM sent: SIGKILL to its process group at this time
    stop_deadline: float | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def reaped(self) -> bool:
        return self.proc.returncode is not None


@dataclass
class ReloadJob:
    """A rolling reload, advanced one step per turn of the main loop."""

    waiters: list[Future]
    #: who hears of each step as it happens (the queue of a `reload` client that asked for "progress")
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    roles: list[Role] = field(default_factory=lambda: [Role.STANDBY, Role.PRIMARY])
    new: Managed | None = None
    old: Managed | None = None
    phase: str = "start"  # start → ready (new one becoming active) → drain (old one stopping)
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)
    done: list[dict[str, Any]] = field(default_factory=list)
    options: ReloadOptions = field(default_factory=ReloadOptions)
    #: the runner's health path before this reload set another (restored if it rolls back)
    previous_health_path: str | None = None
    # -- a canary reload (options.canary): the new standby earns its weights step by step
    canary_step: int = -1  # index into the plan's weights; -1 before the first
    step_started: float = 0.0
    base_new: Outcomes = field(default_factory=Outcomes)
    base_old: Outcomes = field(default_factory=Outcomes)
    old_at_start: Outcomes = field(default_factory=Outcomes)  # the old primary's when the canary began
    old_pid: int | None = None  # the old primary compared against
    old_drained: bool = False  # the old standby is drained (out of the table) while the canary runs
    waited_said: float = 0.0
    verdicts: list[dict[str, Any]] = field(default_factory=list)


class SupervisorChild:
    """The supervisor process: started, pinged, and restarted with backoff when dead or unreachable."""

    def __init__(self, options: SuperviseOptions, control: str, drop_env: frozenset[str] = frozenset()) -> None:
        # The control path is fixed here: the instances are told it, whatever the environment says.
        self.cmd = replace(options, control=control).command()
        self.drop_env = drop_env
        self.service = options.service
        self.control = control
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.state = "down"  # down → starting → up
        self.deadline = 0.0
        self.next_attempt = 0.0
        self.next_ping = 0.0
        self.missed = 0
        self.failures = 0  # failed starts in a row
        self.restarts = 0
        self.last_error: str | None = None
        self.down_since: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=child_env(self.drop_env))
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.state, self.deadline = "starting", time.monotonic() + SUPERVISOR_START_TIMEOUT
        log.info("started the supervisor (pid %d)", self.proc.pid)

    def ping(self, timeout: float) -> str | None:
        """None when it answers, else why not."""
        try:
            client.query(self.service, "ping", self.control, timeout=timeout)
            return None
        except (SupervisorUnavailable, ProtocolError, OSError) as exc:
            return str(exc) or type(exc).__name__

    def reap(self) -> int | None:
        """Wait for the exited process and forget it; its exit status."""
        if self.proc is None:
            return None
        status = self.proc.wait()
        assert self.pidfd is not None
        os.close(self.pidfd)
        self.proc, self.pidfd = None, None
        return status

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal it through its pidfd and reap it."""
        if self.proc is None or self.pidfd is None:
            return None
        send(self.pidfd, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(self.pidfd, signal.SIGKILL)
        return self.reap()

    def failed(self, error: str) -> None:
        """A start failed, or it died or stopped answering: try again after the backoff."""
        now = time.monotonic()
        self.last_error = error
        self.down_since = self.down_since or now
        self.failures += 1
        # The first restart at once (it usually works), then 0.5 s, 1 s, 2 s... at most 30 s.
        first, cap = SUPERVISOR_BACKOFF
        delay = 0.0 if self.failures == 1 else min(cap, first * 2 ** (self.failures - 2))
        self.next_attempt = now + delay
        self.state = "down"
        log.error("supervisor %s; restarting it in %.1f s (attempt %d; the instances keep serving)",
                  error, delay, self.failures)

    def tend(self) -> None:
        """One step: notice a death, a failed or finished start, missed pings; start when due."""
        now = time.monotonic()
        if self.proc is not None and self.pidfd is not None and has_exited(self.pidfd):
            status = self.reap()
            what = "exited" if self.state == "up" else "exited while starting"
            self.failed(f"{what} with status {status}")
            return
        if self.state == "down":
            if now >= self.next_attempt:
                self.restarts += 1
                self.spawn()
            return
        if self.state == "starting":
            if self.ping(timeout=1.0) is None:
                if self.failures:
                    log.warning("supervisor is back (pid %s) after %d failed attempt(s)", self.pid, self.failures)
                self.state, self.missed, self.failures = "up", 0, 0
                self.last_error, self.down_since = None, None
                self.next_ping = now + PING_INTERVAL
            elif now > self.deadline:
                self.kill()
                self.failed(f"did not answer within {SUPERVISOR_START_TIMEOUT:.0f} s of starting")
            return
        if now >= self.next_ping:
            self.next_ping = now + PING_INTERVAL
            problem = self.ping(timeout=PING_TIMEOUT)
            if problem is None:
                self.missed = 0
                return
            self.missed += 1
            log.warning("supervisor did not answer ping (%d of %d): %s", self.missed, PING_FAILURES, problem)
            if self.missed >= PING_FAILURES:
                status = self.kill()
                self.failed(f"alive but not answering on {self.control} ({problem}); killed it (status {status})")

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "failed_attempts": self.failures,
                "last_error": self.last_error,
                "down_for_s": None if self.down_since is None else round(now - self.down_since, 1),
                "next_attempt_in_s": round(max(0.0, self.next_attempt - now), 1) if self.state == "down" else None}


class Runner:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.health_path = cfg.health_path  # for the instances started from now on (spawn)
        self.control = cfg.supervisor.control_path
        self.run_path = run_socket_path(self.control)
        self.current: dict[Role, Managed | None] = {Role.PRIMARY: None, Role.STANDBY: None}
        self.live: list[Managed] = []  # every instance master not reaped yet (current, new, retiring)
        self.crashes: dict[Role, list[float]] = {Role.PRIMARY: [], Role.STANDBY: []}
        self.next_start: dict[Role, float] = {Role.PRIMARY: 0.0, Role.STANDBY: 0.0}
        self.orphans = Orphans(ENV_GENERATION)
        self.reload_job: ReloadJob | None = None
        self.last_reload: dict[str, Any] | None = None
        self._generation = 0
        self._stopping = threading.Event()
        self._requests: queue.SimpleQueue[tuple[Future, Callable[[dict[str, Any]], None] | None, ReloadOptions]] = \
            queue.SimpleQueue()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.supervisor = SupervisorChild(cfg.supervisor, self.control, cfg.drop_env)
        self._server: socket.socket | None = None
        self._reload_requested = False
        self._snapshot: dict[str, Any] = {}
        self._told_ready = False
        self.workdir = tempfile.mkdtemp(prefix="reuseport-standby-run-")
        try:
            self.instance_cmd = instance_command(cfg.command, self.workdir)
            if cfg.user is not None:  # the composed gunicorn config must be readable by the instances
                for path in (self.workdir, *(os.path.join(self.workdir, n) for n in os.listdir(self.workdir))):
                    os.chown(path, cfg.user.uid, cfg.user.gid)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    # -- supervisor ------------------------------------------------------------------------
    def start_supervisor(self) -> None:
        """The first start: a supervisor that cannot start at all stops ``run`` (nothing serves yet)."""
        sup = self.supervisor
        sup.spawn()
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT
        while True:
            assert sup.pidfd is not None
            if has_exited(sup.pidfd):
                raise ReuseportStandbyError(f"the supervisor exited with status {sup.reap()}: its log above says why",
                                            see="supervisor-not-running")
            if sup.ping(timeout=1.0) is None:
                sup.state, sup.next_ping = "up", time.monotonic() + PING_INTERVAL
                return
            if time.monotonic() > deadline:
                sup.kill()
                raise SupervisorUnavailable(f"the supervisor did not answer within {SUPERVISOR_START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    # -- instances ---------------------------------------------------------------------------
    def spawn(self, role: Role) -> Managed:
        self._generation += 1
        env = {**child_env(self.cfg.drop_env), **self.cfg.extra_env, ENV_ROLE: role.value,
               ENV_SERVICE: self.cfg.service, ENV_CONTROL: self.control,
               ENV_GENERATION: str(self._generation)}
        if self.health_path:
            env[ENV_HEALTH_PATH] = self.health_path
        user = self.cfg.user
        kwargs: dict[str, Any] = {}
        if user is not None:
            env.update(USER=user.name, LOGNAME=user.name, HOME=user.home)
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.extra_groups)}
        try:
            proc = subprocess.Popen(self.instance_cmd, env=env, start_new_session=True, **kwargs)
        except OSError as exc:  # not found, not executable by the user...: the exec failed in the child
            raise InstanceFailed(f"cannot start the {role.value}: {exc}") from None
        m = Managed(role, proc, os.pidfd_open(proc.pid), time.monotonic(), self._generation)
        self.live.append(m)
        self._sel.register(m.pidfd, selectors.EVENT_READ, "exit")
        log.info("started %s (generation %d, pid %d%s): %s", role.value, self._generation, proc.pid,
                 f", user {user.name}" if user else "", " ".join(self.instance_cmd))
        return m

    def instance_state(self, pid: int) -> str | None:
        try:
            st = client.query(self.cfg.service, "status", self.control, timeout=2)["status"]
        except (SupervisorUnavailable, ProtocolError, OSError):
            return None
        return instance_state(st, pid)

    def retire(self, m: Managed, timeout: float | None = None) -> None:
        """SIGTERM the master (the integration leaves its slots first, then drains); SIGKILL its group later."""
        if m.stop_deadline is not None or m.reaped:
            return
        m.stop_deadline = time.monotonic() + (self.cfg.stop_timeout if timeout is None else timeout)
        send(m.pidfd, signal.SIGTERM)

    def _kill_group(self, m: Managed, sig: int) -> None:
        """Signal the instance's process group.  Only while its leader is unreaped: until then its
        pid, which is the group's id, cannot name anyone else's group."""
        if m.reaped:
            return
        try:
            os.killpg(m.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _collect_exits(self) -> None:
        """Reap the masters that exited; record crashes; stop what a dead master left behind."""
        now = time.monotonic()
        for m in list(self.live):
            if not has_exited(m.pidfd):
                if m.stop_deadline is not None and now >= m.stop_deadline and not m.killed:
                    log.warning("%s pid %d did not stop in time; killing its process group", m.role.value, m.pid)
                    self._kill_group(m, signal.SIGKILL)
                    m.killed = True
                continue
            # Still a zombie: its workers still carry its group id. They get no new connections (the
            # master's control connection is gone), SIGTERM lets each finish its request.
            self._kill_group(m, signal.SIGTERM)
            self._sel.unregister(m.pidfd)
            os.close(m.pidfd)
            m.proc.wait()
            self.live.remove(m)
            if self.current[m.role] is m:
                if m.stop_deadline is None:
                    self._crashed(m, now)
                else:
                    self.current[m.role] = None
        self.orphans.adopt(self._known_pids())
        self.orphans.tend({str(m.generation) for m in self.live}, self.cfg.stop_timeout)

    def _crashed(self, m: Managed, now: float) -> None:
        lived = now - m.started
        log.error("%s (pid %d) exited with status %s after %.1f s", m.role.value, m.pid, m.proc.returncode, lived)
        self.current[m.role] = None
        self.crashes[m.role] = [t for t in self.crashes[m.role] if now - t < 60] + [now]
        n = len(self.crashes[m.role])
        backoff = min(30.0, 0.5 * 2 ** (n - 1)) if lived < 10 else 0.5
        if n >= 5:
            log.error("%s is crash-looping: %d exits in 60 s; next start in %.0f s", m.role.value, n, backoff)
        self.next_start[m.role] = now + backoff
        job = self.reload_job
        if job is not None and job.roles and job.roles[0] is m.role:
            log.warning("the old %s died during the reload; the reload replaces it", m.role.value)

    def _known_pids(self) -> set[int]:
        pids = {m.pid for m in self.live}
        if self.supervisor.pid is not None:
            pids.add(self.supervisor.pid)
        return pids

    def _restart_missing(self) -> None:
        """Start a role that has no instance, when its backoff allows; never one a reload is replacing."""
        now = time.monotonic()
        job = self.reload_job
        for role in Role:
            owned = job is not None and bool(job.roles) and job.roles[0] is role
            if self.current[role] is None and not owned and now >= self.next_start[role]:
                try:
                    self.current[role] = self.spawn(role)
                except InstanceFailed as exc:
                    self.next_start[role] = now + 5.0
                    log.error("%s; next attempt in 5 s", exc)

    # -- rolling reload --------------------------------------------------------------------------
    def begin_reload(self, fut: Future | None = None, listener: Callable[[dict[str, Any]], None] | None = None,
                     options: ReloadOptions | None = None) -> None:
        waiters = [fut] if fut is not None else []
        if self.reload_job is not None:
            for f in waiters:
                f.set_exception(ReuseportStandbyError("a reload is already in progress"))
            log.warning("a reload is already in progress")
            return
        options = options or ReloadOptions()
        job = self.reload_job = ReloadJob(waiters, listeners=[listener] if listener is not None else [],
                                          options=options, previous_health_path=self.health_path)
        if options.health_path is not None:
            self.health_path = options.health_path or None  # "": no health check from now on
        if options.canary is None:
            self._progress("rolling reload: standby, then primary", step="begin")
            return
        plan = options.canary
        job.roles = [Role.STANDBY]  # the canary; once promoted, the old primary (then the standby) is replaced
        self._progress(f"canary reload: a new standby takes {', then '.join(f'{w}%' for w in plan.weights)} of "
                       f"new connections for {plan.step_seconds:g} s each; it is promoted if its error rate stays "
                       f"within {plan.max_error_rate:.2%} of the old version's and its p99 within "
                       f"{plan.max_latency_ratio:g}x, else rolled back", step="begin", canary=plan.to_wire())

    def _progress(self, text: str, **fields: Any) -> None:
        """One step of the reload: logged, and told to the clients that asked to hear (never blocks)."""
        log.info("%s", text)
        job = self.reload_job
        if job is None:
            return
        event = {"progress": text, "seconds": round(time.monotonic() - job.started, 2), **fields}
        for listener in job.listeners:
            try:
                listener(event)
            except Exception:  # a listener is a queue put; whatever it does, the reload goes on
                log.debug("a reload progress listener failed", exc_info=True)

    def _finish_reload(self, result: dict[str, Any] | None, error: Exception | None) -> None:
        job = self.reload_job
        assert job is not None
        self.reload_job = None
        if error is not None and not job.done:  # nothing was replaced: the instances still run the old settings
            self.health_path = job.previous_health_path
        self.last_reload = {"ok": error is None, "error": None if error is None else str(error)}
        if error is not None:
            log.error("reload failed: %s", error)
        else:
            log.info("reload done in %s s", result["seconds"])  # type: ignore[index]
        for f in job.waiters:
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result(result)

    def _step_reload(self) -> None:
        job = self.reload_job
        if job is None:
            return
        if job.options.canary is not None:
            try:
                self._step_canary(job)
            except Exception as exc:  # a fault of ours rolls the canary back; it never ends `run`
                log.exception("the canary reload failed")
                if self.reload_job is job:
                    self._canary_rollback(job, f"an internal error: {type(exc).__name__}: {exc}")
            return
        role = job.roles[0]
        now = time.monotonic()
        if job.phase == "start":
            try:
                job.old, job.new = self.current[role], self.spawn(role)
            except InstanceFailed as exc:
                self._finish_reload(None, exc)
                return
            job.phase, job.deadline = "ready", now + self.cfg.ready_timeout
            self._progress(f"started new {role.value} pid {job.new.pid}; waiting up to "
                           f"{self.cfg.ready_timeout:.0f} s for it to serve", step="started", role=role.value,
                           pid=job.new.pid)
            return
        new = job.new
        assert new is not None
        if job.phase == "ready":
            if new.reaped:
                self._finish_reload(None, InstanceFailed(
                    f"new {role.value} (pid {new.pid}) exited with status {new.proc.returncode} before it was ready"
                    f"; rolled back, the old {role.value} keeps serving"))
                return
            if self.instance_state(new.pid) == "active":
                self.current[role] = new
                if job.old is not None:
                    self.retire(job.old)
                job.phase = "drain"
                old = f"; stopping old pid {job.old.pid}" if job.old is not None else ""
                self._progress(f"new {role.value} pid {new.pid} is serving{old}", step="serving", role=role.value,
                               pid=new.pid, old_pid=None if job.old is None else job.old.pid)
            elif now > job.deadline:
                self.retire(new, timeout=5)
                self._finish_reload(None, InstanceFailed(
                    f"new {role.value} (pid {new.pid}) was not ready within {self.cfg.ready_timeout:.0f} s"
                    f"; rolled back, the old {role.value} keeps serving"))
            return
        if job.old is None or job.old.reaped:  # drain: the old one is gone
            if job.old is not None:
                self._progress(f"old {role.value} pid {job.old.pid} stopped", step="stopped", role=role.value,
                               pid=job.old.pid)
            job.done.append({"role": role.value, "pid": new.pid, "generation": new.generation})
            job.roles.pop(0)
            job.new = job.old = None
            job.phase = "start"
            if not job.roles:
                self._finish_reload(self._reload_result(job), None)

    # -- canary reload ---------------------------------------------------------------------------
    def _step_canary(self, job: ReloadJob) -> None:
        """start → ready (the new standby becoming active) → step (one per weight) → promoted; then the
        old primary, now the standby, is replaced like any rolling reload.  Every failure rolls back."""
        plan = job.options.canary
        assert plan is not None
        now = time.monotonic()
        if job.phase == "start":
            try:
                job.old, job.new = self.current[Role.STANDBY], self.spawn(Role.STANDBY)
            except InstanceFailed as exc:
                self._finish_reload(None, exc)
                return
            job.phase, job.deadline = "ready", now + self.cfg.ready_timeout
            self._progress(f"started the canary: new standby pid {job.new.pid}; waiting up to "
                           f"{self.cfg.ready_timeout:.0f} s for it to serve", step="started", role="standby",
                           pid=job.new.pid)
            return
        new = job.new
        assert new is not None
        if new.reaped:
            self._canary_rollback(job, f"the new version (pid {new.pid}) exited with status {new.proc.returncode}")
            return
        if job.phase == "ready":
            state = self.instance_state(new.pid)
            if state == "active":
                if job.old is not None and not job.old.reaped:
                    # The new standby alone holds the standby's share: the old one stays, out of the table,
                    # to be undrained if the canary fails.
                    try:
                        self._admin({"op": "drain", "role": "standby", "pid": job.old.pid})
                    except (ReuseportStandbyError, OSError) as exc:
                        self._canary_rollback(job, f"the old standby could not be drained: {exc}")
                        return
                    job.old_drained = True
                self._canary_begin_step(job, 0)
            elif now > job.deadline:
                health = f" (no 2xx from its workers' GET {self.health_path}: its log says why)" \
                    if self.health_path else ""
                self._canary_rollback(job, f"the new version (pid {new.pid}) was not ready within "
                                           f"{self.cfg.ready_timeout:.0f} s{health}")
            return
        if job.phase != "step" or now < job.step_started + plan.step_seconds:
            return
        seen = self._canary_outcomes(job)
        if seen is None:
            if now > job.step_started + plan.step_limit + 10:
                self._canary_rollback(job, "the supervisor's outcomes could not be read to judge the canary")
            return
        new_now, old_now = seen
        final = now >= job.step_started + plan.step_limit
        verdict = canary.judge(plan, new_now - job.base_new, old_now - job.base_old, old_now - job.old_at_start,
                               final=final)
        weight = plan.weights[job.canary_step]
        if verdict.passed is None:
            if now - job.waited_said >= plan.step_seconds:
                job.waited_said = now
                self._progress(f"step {job.canary_step + 1} ({weight}%): {verdict.new['requests']} of the "
                               f"{plan.min_requests} requests needed to judge; waiting up to "
                               f"{job.step_started + plan.step_limit - now:.0f} s more", step="waiting",
                               weight=weight, new=verdict.new)
            return
        record = {"step": job.canary_step + 1, "weight": weight,
                  "seconds": round(now - job.step_started, 1), **verdict.as_dict()}
        job.verdicts.append(record)
        if not verdict.passed:
            self._canary_rollback(job, f"step {job.canary_step + 1} ({weight}%) failed: " + "; ".join(verdict.reasons))
            return
        self._progress(f"step {job.canary_step + 1} ({weight}%) passed: {canary.figures(verdict.new)} against the old "
                       f"version's {canary.figures(verdict.old)}", step="passed", verdict=record)
        if job.canary_step + 1 < len(plan.weights):
            self._canary_begin_step(job, job.canary_step + 1)
        else:
            self._canary_promote(job)

    def _canary_begin_step(self, job: ReloadJob, index: int) -> None:
        plan = job.options.canary
        assert plan is not None and job.new is not None
        seen = self._canary_outcomes(job)
        if seen is None:
            self._canary_rollback(job, "the supervisor's outcomes could not be read to begin the canary step")
            return
        job.base_new, job.base_old = seen
        if index == 0:
            job.old_at_start = job.base_old
        weight = plan.weights[index]
        try:
            self._admin({"op": "weight", "standby": weight})
        except (ReuseportStandbyError, OSError) as exc:
            self._canary_rollback(job, f"the standby weight could not be set: {exc}")
            return
        job.canary_step, job.phase = index, "step"
        job.step_started = job.waited_said = time.monotonic()
        self._progress(f"step {index + 1} of {len(plan.weights)}: the new version takes {weight}% of new "
                       f"connections for {plan.step_seconds:g} s", step="weight", weight=weight, pid=job.new.pid)

    def _canary_outcomes(self, job: ReloadJob) -> tuple[Outcomes, Outcomes] | None:
        """The new standby's and the old primary's cumulative outcomes, from one ``status``."""
        old = self.current[Role.PRIMARY]
        try:
            st = client.query(self.cfg.service, "status", self.control, timeout=2)["status"]
            assert job.new is not None
            if old is not None and job.old_pid not in (None, old.pid):
                log.warning("the old primary changed (pid %s, now %d) during the canary; comparing with the new one",
                            job.old_pid, old.pid)
            job.old_pid = None if old is None else old.pid
            return (canary.instance_outcomes(st, job.new.pid),
                    Outcomes() if old is None else canary.instance_outcomes(st, old.pid))
        except (SupervisorUnavailable, ProtocolError, OSError, KeyError, ValueError) as exc:
            log.warning("could not read the instances' outcomes: %s", exc)
            return None

    def _canary_promote(self, job: ReloadJob) -> None:
        """Weight 0, then promote (the new standby becomes the primary: a flag, nothing restarts), then the
        drained old standby stops; the old primary, now the standby, is replaced as in any reload."""
        new = job.new
        assert new is not None
        try:
            self._admin({"op": "weight", "standby": 0})
            self._admin({"op": "promote"})
        except (ReuseportStandbyError, OSError) as exc:
            self._canary_rollback(job, f"the new version passed but could not be promoted: {exc}")
            return
        old_primary = self.current[Role.PRIMARY]
        if job.old is not None:
            self.retire(job.old)  # drained, and now in the primary's range, still out of the table
        new.role, self.current[Role.PRIMARY] = Role.PRIMARY, new
        if old_primary is not None:
            old_primary.role, self.current[Role.STANDBY] = Role.STANDBY, old_primary
        else:
            self.current[Role.STANDBY] = None
        job.done.append({"role": "primary", "pid": new.pid, "generation": new.generation, "promoted": True})
        self._progress(f"promoted: the new version (pid {new.pid}) is the primary"
                       + (f"; the old primary (pid {old_primary.pid}) is the standby until it is replaced"
                          if old_primary is not None else ""), step="promoted", pid=new.pid)
        job.options = replace(job.options, canary=None)  # from here on, a plain rolling reload of the standby
        job.roles, job.new, job.old, job.phase = [Role.STANDBY], None, None, "start"
        if old_primary is None:
            job.roles = []
            self._finish_reload(self._reload_result(job), None)

    def _canary_rollback(self, job: ReloadJob, why: str) -> None:
        """Weight 0, the old standby back in the table, the new one stopped: the old version serves on."""
        new = job.new
        for msg in ({"op": "weight", "standby": 0},
                    {"op": "undrain", "role": "standby", "pid": job.old.pid} if job.old_drained and job.old else None):
            if msg is None:
                continue
            try:
                self._admin(msg)
            except (ReuseportStandbyError, OSError) as exc:
                log.error("rolling back the canary: %s failed: %s", msg["op"], exc)
        if new is not None:
            self.retire(new, timeout=self.cfg.stop_timeout)
        if job.old is not None and job.old.reaped:
            log.warning("the old standby exited during the canary; the standby is restarted from what is on disk")
        fields = {"canary": {"verdicts": job.verdicts, "plan": job.options.canary.to_wire() if job.options.canary else None,
                             "pid": None if new is None else new.pid}}
        self._progress(f"rolled back: {why}", step="rolled_back", **fields)
        self._finish_reload(None, CanaryRolledBack(f"canary {why if why.startswith('step') else 'reload: ' + why}"
                                                   f"; rolled back: the new version (pid "
                                                   f"{None if new is None else new.pid}) is stopped, the old "
                                                   f"version serves on", fields))

    def _admin(self, msg: dict[str, Any]) -> dict[str, Any]:
        return client.admin(self.cfg.service, msg, self.control, timeout=5)

    def _reload_result(self, job: ReloadJob) -> dict[str, Any]:
        result = {"ok": True, "replaced": job.done, "seconds": round(time.monotonic() - job.started, 2)}
        if job.verdicts:
            result["canary"] = {"verdicts": job.verdicts}
        return result

    def reload(self, timeout: float | None = None, options: ReloadOptions | None = None) -> dict[str, Any]:
        """From another thread: ask the main loop for a rolling reload and wait for its outcome."""
        return self.submit_reload(options=options).result(timeout)

    def submit_reload(self, listener: Callable[[dict[str, Any]], None] | None = None,
                      options: ReloadOptions | None = None) -> Future:
        """From another thread: ask the main loop for a rolling reload; ``listener`` hears each step."""
        fut: Future = Future()
        self._requests.put((fut, listener, options or ReloadOptions()))
        self._wake()
        return fut

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- control socket for `reuseport-standby reload` and `status` -----------------------------
    def _bind_run_socket(self) -> None:
        self._server = protocol.listen_unix(self.run_path, "'reuseport-standby run'", backlog=8)
        self._sel.register(self._server, selectors.EVENT_READ, "run")

    def _serve_request(self, conn: socket.socket) -> None:
        """Answer one request, in a thread of its own (a reload takes a while; the thread only waits).

        Every request gets a reply, also one that is not a JSON object or that
        fails in an unforeseen way; a reply longer than one message (a long
        error, a big result) travels in chunks, as the supervisor's do, and
        ``request_reload`` joins them.  A peer that sends nothing, or does not
        read, is given up after RELOAD_IO_TIMEOUT.
        """
        def work() -> None:
            with conn:
                conn.settimeout(RELOAD_IO_TIMEOUT)
                reply = self._reply(conn)
                if reply is None:
                    return
                try:
                    protocol.send_reply(conn, reply)
                except (ProtocolError, TypeError, ValueError) as exc:  # cannot be encoded, even in chunks
                    log.error("the reply to a run request could not be encoded: %s", exc)
                    try:
                        protocol.send_reply(conn, protocol.error_reply("internal", f"the reply could not be encoded: {exc}"))
                    except OSError:
                        pass
                except OSError:
                    pass  # the peer went away or did not read: the reload itself is done either way

        threading.Thread(target=work, name="run-request", daemon=True).start()

    def _reply(self, conn: socket.socket) -> dict[str, Any] | None:
        """Read the request and answer it; the reply to send (None: the peer left without asking)."""
        try:
            raw, fds, truncated = protocol.recv(conn)
        except OSError:  # nothing within RELOAD_IO_TIMEOUT, or the peer reset
            return None
        for fd in fds:
            os.close(fd)
        if not raw and not truncated:
            return None
        if truncated:
            return protocol.error_reply("too_large", f"a request is at most {protocol.MAX_MESSAGE} bytes, without fds")
        try:
            msg = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return protocol.error_reply("malformed", f"not a UTF-8 JSON message: {exc}")
        if isinstance(msg, dict) and msg.get("op") == "status":
            return {"ok": True, "run": self._snapshot}
        if not isinstance(msg, dict) or msg.get("op") != "reload":
            return protocol.error_reply("unknown_op", "this socket takes only {\"op\": \"reload\"} and {\"op\": \"status\"}")
        try:
            options = reload_options(msg)
        except ValueError as exc:
            return protocol.error_reply("bad_request", str(exc))
        try:
            return self._stream_reload(conn, options) if msg.get("progress") is True else self.reload(options=options)
        except InstanceFailed as exc:
            return {**protocol.error_reply("rolled_back", str(exc)), **exc.reply_fields}
        except (ReuseportStandbyError, ValueError, OSError) as exc:
            return protocol.error_reply("failed", str(exc))
        except Exception as exc:  # whatever went wrong, `reload` hears of it instead of a closed connection
            log.exception("reload failed")
            return protocol.error_reply("internal", f"{type(exc).__name__}: {exc}")

    def _stream_reload(self, conn: socket.socket, options: ReloadOptions) -> dict[str, Any]:
        """A reload whose steps are sent as they happen, each a message ``{"progress": TEXT, "step": ...}``
        (no ``ok``: a client tells them from the reply, which follows them).  A client that does not
        read them is no longer sent any; the reload goes on."""
        events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        fut = self.submit_reload(events.put, options)
        listening = True
        while True:
            done = fut.done()
            while listening:
                try:
                    event = events.get(timeout=0 if done else 0.2)
                except queue.Empty:
                    break
                try:
                    protocol.send_reply(conn, event)
                except (OSError, ProtocolError, TypeError, ValueError):
                    listening = False
            if done:
                return fut.result()
            if not listening:
                fut.exception()  # wait for the outcome without the events

    def _update_snapshot(self) -> None:
        """What ``{"op": "status"}`` answers (read by request threads: replaced whole, never mutated)."""
        self._snapshot = {
            "pid": os.getpid(), "service": self.cfg.service,
            "user": None if self.cfg.user is None else self.cfg.user.name,
            "supervisor": self.supervisor.snapshot(),
            "instances": {r.value: (None if m is None else {"pid": m.pid, "generation": m.generation})
                          for r, m in self.current.items()},
            "reloading": self.reload_job is not None, "last_reload": self.last_reload,
        }

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        become_subreaper()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        try:
            self.start_supervisor()
            self._bind_run_socket()
            self.current[Role.PRIMARY] = self.spawn(Role.PRIMARY)
            self.current[Role.STANDBY] = self.spawn(Role.STANDBY)
            while not self._stopping.is_set():
                self._turn()
        finally:
            self.shutdown()
        return 0

    def _turn(self) -> None:
        """One turn of the loop: every child's life changes here and nowhere else."""
        for key, _ in self._sel.select(0.05 if self.reload_job else 0.2):
            if key.data == "wake":
                try:
                    while self._wake_r.recv(64):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif key.data == "run":
                try:
                    conn, _ = self._server.accept()  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                self._serve_request(conn)
        while not self._requests.empty():
            self.begin_reload(*self._requests.get_nowait())
        if self._reload_requested:
            self._reload_requested = False
            self.begin_reload()
        self._collect_exits()
        self.supervisor.tend()
        self._step_reload()
        self._restart_missing()
        self._notify_ready()
        self._update_snapshot()

    def _notify_ready(self) -> None:
        """Type=notify: READY=1 once both instances serve, the first time (a reload is ExecReload='s)."""
        if self._told_ready or not all(self.current.values()):
            return
        try:
            st = client.query(self.cfg.service, "status", self.control, timeout=2)["status"]
        except (SupervisorUnavailable, ProtocolError, OSError):
            return
        if all(instance_state(st, m.pid) == "active" for m in self.current.values() if m is not None):
            self._told_ready = True
            sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving: primary pid {self.current[Role.PRIMARY].pid}, "  # type: ignore[union-attr]
                      f"standby pid {self.current[Role.STANDBY].pid}")  # type: ignore[union-attr]
            log.info("both instances serve")

    def _stop_and_wait(self, ms: list[Managed]) -> None:
        for m in ms:
            self.retire(m)
        deadline = time.monotonic() + self.cfg.stop_timeout + 10
        while any(not m.reaped for m in ms) and time.monotonic() < deadline:
            self._sel.select(0.05)
            self._collect_exits()

    def shutdown(self) -> None:
        """Standby first, then primary (each leaves its slots, then drains), supervisor last; then
        whatever else descends from us.  Nothing this runner started outlives it."""
        self._stopping.set()
        sd_notify("STOPPING=1")
        job, self.reload_job = self.reload_job, None
        if job is not None:
            for f in job.waiters:
                f.set_exception(ReuseportStandbyError("run is stopping: reload abandoned"))
        while not self._requests.empty():
            self._requests.get_nowait()[0].set_exception(ReuseportStandbyError("run is stopping"))
        standby = [m for m in self.live if m is not self.current[Role.PRIMARY]]
        self._stop_and_wait(standby)
        self._stop_and_wait(list(self.live))
        self.supervisor.kill(signal.SIGTERM, SUPERVISOR_STOP_TIMEOUT)
        self._sweep()
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.run_path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("stopped")

    def _sweep(self) -> None:
        """Stop every remaining descendant (adopted ones): SIGTERM, a grace time, SIGKILL; reap them."""
        grace = min(self.cfg.stop_timeout, 10.0)
        deadline = time.monotonic() + grace
        for _ in range(int((grace + 10) / 0.05)):
            self.orphans.adopt(self._known_pids())
            left = max(0.0, deadline - time.monotonic())
            self.orphans.tend(set(), left, force=True)
            if not self.orphans and not (my_children() - self._known_pids()):
                return
            time.sleep(0.05)
        log.error("some descendants could not be stopped: %s", sorted(self.orphans.adopted))


def reload_options(msg: dict[str, Any]) -> ReloadOptions:
    """A ``reload`` request's options, checked (ValueError saying what is wrong)."""
    plan = canary.CanaryPlan.from_wire(msg["canary"]) if msg.get("canary") is not None else None
    health = msg.get("health_path")
    if health is not None:
        if not isinstance(health, str):
            raise ValueError("'health_path' must be a string")
        if health:
            health = check_health_path(health)
    return ReloadOptions(canary=plan, health_path=health)


def check_health_path(path: str) -> str:
    """A path an instance can GET in process (health_check.parse's rules; ValueError otherwise)."""
    from .health_check import HealthPathError, parse

    try:
        parse(path, "a health path")
    except HealthPathError as exc:
        raise ValueError(str(exc)) from None
    return path


def run(cfg: RunConfig) -> int:
    return Runner(cfg).run()


def main_args(command: Sequence[str]) -> list[str]:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("give the server command after '--', e.g. -- gunicorn -w 2 myapp.wsgi")
    return list(command)
