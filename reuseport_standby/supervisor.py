"""The supervisor: owns the program, the maps and the addresses; brokers listeners.

It is the only privileged process.  It creates every listening socket (so
all members of a group share its uid, which the kernel requires), hands one
per address to each instance over the control socket, and puts an
instance's sockets into slots of its role only once the instance says it
is ready.  After activation it keeps no fd of an instance socket: the
instance's exit must close the socket, which is what empties the slot and
migrates the queue.

Crash safety comes from the kernel: the group and its program live as long
as any member socket, and the maps are pinned.  A restarted supervisor
re-opens the pins and finds the slots as the kernel kept them; instances
reconnect and re-announce their sockets (``readopt``).
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import protocol
from .kernel import diag, pidfd
from .errors import ProtocolError, ReuseportStandbyError, SlotsFull
from .kernel.layout import FLAG_SWAP_ROLES, PARKING_SLOT, WORKERS_PER_INSTANCE, Role, slot_range
from .kernel.pins import DEFAULT_PIN_ROOT
from .kernel.group import Group
from .kernel.sockets import socket_cookie
from .kernel.sockets import DEFAULT_BACKLOG, Address, create_listener, is_listening_tcp, requeue

log = logging.getLogger(__name__)

PENDING, ACTIVE, DRAINING = "pending", "active", "draining"
DRAINED, DEMOTED = "drained", "demoted"   # slots kept but disabled: by an operator, or for hanging
ON_HANG = ("demote", "term", "kill")
TICK = 0.1  # seconds between health checks
#: seconds a peer has to take a reply its socket buffer could not hold; then it is dropped, never waited for
SEND_TIMEOUT = 2.0
#: seconds without accepting after running out of file descriptors (the peers already connected are served)
ACCEPT_PAUSE = 0.5
FD_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: control connections one uid (root excepted) may hold: worker scope needs 2 roles x 2 instances x
#: (1 + 16 workers) = 68 during a rolling reload, plus operators' commands
MAX_CONNECTIONS_PER_UID = 128
#: instances of one role one uid (root excepted) may hold: the two that overlap in a rolling restart
INSTANCES_PER_ROLE_PER_UID = 2
COMPLAINT_INTERVAL = 10.0  # seconds: the same failure is logged with its traceback at most this often


@dataclass
class Instance:
    """One connected app instance (a gunicorn master, a uvicorn process...)."""

    id: int
    conn: socket.socket
    pid: int
    uid: int
    role: Role | None = None
    name: str = ""
    state: str = PENDING
    since: float = field(default_factory=time.time)
    pending: dict[Address, socket.socket] = field(default_factory=dict)  # our copies, until activation
    cookies: dict[Address, int] = field(default_factory=dict)
    slots: dict[Address, int] = field(default_factory=dict)
    heartbeat: float | None = None       # interval the instance promised, if any
    last_heartbeat: float = field(default_factory=time.monotonic)
    demoted_at: float = 0.0
    demotions: int = 0
    demoted_for: str = ""
    progress: dict[Address, "Progress"] = field(default_factory=dict)
    scope: str = "instance"              # "worker": its workers register on their own; its sockets stay pending
    parent: int | None = None            # a worker's: the pid of the instance it belongs to
    parent_checked: bool = True          # False: the kernel says this "worker" is no child of ``parent``
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)  # reply frames not taken yet (fds: our dups)
    send_by: float = 0.0                 # monotonic deadline for the outbox to empty

    def describe(self) -> str:
        what = "worker of pid %d, " % self.parent if self.parent is not None else ""
        return f"instance {self.id} ({self.role.value if self.role else '?'}, {what}pid {self.pid}{', ' + self.name if self.name else ''})"


@dataclass
class Progress:
    """Is an active listener still being accepted from?  (hits from BPF, depth from sock_diag)"""

    hits: int
    queued: int
    last: float  # monotonic time of the last sign of progress

    def update(self, hits: int, queued: int, now: float) -> float:
        """Seconds without progress: nothing accepted while connections waited."""
        accepted = (hits - self.hits) - (queued - self.queued)
        if queued == 0 or accepted > 0:
            self.last = now
        self.hits, self.queued = hits, queued
        return now - self.last


@dataclass
class AddressState:
    address: Address
    group: Group
    anchor: socket.socket


class Supervisor:
    """Brokers one service's listeners; run with :meth:`serve_forever`."""

    def __init__(
        self,
        service: str,
        addresses: list[Address],
        *,
        control: str | None = None,
        backlog: int = DEFAULT_BACKLOG,
        group: str | None = None,
        pin_root: str = DEFAULT_PIN_ROOT,
        migrate: bool | None = None,
        mount_bpffs: bool = False,
        stall_timeout: float = 2.0,
        on_hang: str = "demote",
        loader: str = "libbpf",
        bpf_source: str | None = None,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
    ) -> None:
        if not addresses:
            raise ValueError("a service needs at least one --bind address")
        if len(set(addresses)) != len(addresses):
            raise ValueError("the same address is given twice")
        self.service = protocol.check_service(service)
        self.addresses = list(addresses)
        self.control_path = protocol.control_path(service, control)
        self.backlog = backlog
        self.group_name = group
        self.gid = _resolve_group(group) if group else None
        self.pin_dir = Path(pin_root) / service
        self.migrate = migrate
        self.mount_bpffs = mount_bpffs
        if on_hang not in ON_HANG:
            raise ValueError(f"--on-hang must be one of {', '.join(ON_HANG)}")
        if stall_timeout < 0:
            raise ValueError("--stall-timeout must be >= 0 (0 turns stall detection off)")
        self.stall_timeout = stall_timeout
        self.on_hang = on_hang
        self.loader = loader
        self.bpf_source = bpf_source
        if max_connections_per_uid < 1:
            raise ValueError("--max-connections-per-uid must be at least 1")
        self.max_connections_per_uid = max_connections_per_uid
        self._uid_connections: Counter[int] = Counter()
        self._accept_paused_until: float | None = None
        self._fd_pauses = 0
        self._complaints: dict[str, float] = {}
        self.swapped = False
        self.demotions_total = 0
        self._next_health = 0.0
        self.states: dict[Address, AddressState] = {}
        self.instances: dict[int, Instance] = {}  # by control fd
        self._ids = itertools.count(1)
        self._sel = selectors.DefaultSelector()
        self._server: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self.started_at = 0.0

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        """Load or re-adopt the pinned program and maps, open anchors, listen for instances."""
        t0 = time.monotonic()
        try:
            for address in self.addresses:
                self.states[address] = self._open_address(address)
            first = next(iter(self.states.values())).group.read_config()
            self.swapped = first.swapped
            for st in self.states.values():  # a promote interrupted half-way is finished now
                self._edit_config(st.group, flags=FLAG_SWAP_ROLES if self.swapped else 0)
            self._server = self._bind_control()
        except BaseException:
            self.close()
            raise
        self._sel.register(self._server, selectors.EVENT_READ, ("accept", None))
        for st in self.states.values():
            self._release_parked(st)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.started_at = time.time()
        log.info("service %s ready on %s (control %s, %s, %s loader, %.1f ms)", self.service,
                 ", ".join(map(str, self.addresses)), self.control_path,
                 "select-or-migrate" if self._migrating else "plain select (no migration)", self.loader,
                 (time.monotonic() - t0) * 1000)

    @property
    def _migrating(self) -> bool:
        return all(s.group.migrate for s in self.states.values())

    def _open_address(self, address: Address) -> AddressState:
        group = Group.open(self.pin_dir / address.group_name, migrate=self.migrate, mount_bpffs=self.mount_bpffs,
                           loader=self.loader, bpf_source=self.bpf_source)
        if self.gid is not None:
            group.share_read_only(self.gid)
        try:
            anchor = create_listener(address, self.backlog)
        except OSError as exc:
            group.close()
            raise ReuseportStandbyError(
                f"cannot listen on {address}: {exc.strerror}. "
                + ("Another process holds this port without SO_REUSEPORT, or as another user; stop it first."
                   if exc.errno == 98 else
                   "Binding a port below 1024 needs CAP_NET_BIND_SERVICE." if exc.errno == 13 else "")) from exc
        # Attach after listen(): attaching first would make the anchor a group of its own.
        group.attach(anchor)
        self._fill_parking(group, anchor)
        orphans = {i: c for i, c in group.slots().items() if i != PARKING_SLOT}
        if orphans:
            log.info("%s: re-adopted %d live slot(s) from before this supervisor started: %s",
                     address, len(orphans), sorted(orphans))
        self._update_live(group)
        st = AddressState(address, group, anchor)
        return st

    def _fill_parking(self, group: Group, anchor: socket.socket) -> None:
        group.clear_slot(PARKING_SLOT)
        group.set_slot(PARKING_SLOT, anchor)

    def _bind_control(self) -> socket.socket:
        server = protocol.listen_unix(self.control_path, "supervisor")
        if self.gid is not None:
            try:
                _give_to_group(self.control_path, self.gid, self.group_name)
            except BaseException:
                server.close()
                raise
        return server

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from signal handlers and threads)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Stop brokering; traffic keeps flowing through the instances' sockets."""
        for inst in list(self.instances.values()):
            self._close_pending(inst)
            self._unregister(inst)
        if self._server is not None:
            if self._server.fileno() in self._sel.get_map():
                self._sel.unregister(self._server)
            self._server.close()
            self._server = None
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        for st in self.states.values():
            # Closing the anchor migrates anything parked to a live instance.
            self._watch_anchor(st, False)
            st.anchor.close()
            st.group.close()
        self.states.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def serve_forever(self, *, install_signals: bool = True, notify: bool = True) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        if notify:
            sd_notify("READY=1\nSTATUS=serving " + ", ".join(map(str, self.addresses)))
        while not self._stopping:
            self.step(TICK)
            self.run_timers()
        log.info("service %s: supervisor stopping; instances keep serving", self.service)
        if notify:
            sd_notify("STOPPING=1")

    def step(self, timeout: float | None) -> None:
        """Handle what is ready.  A failure ends that peer (or is logged), never the loop."""
        for key, _ in self._sel.select(timeout):
            kind, peer = key.data
            try:
                self._dispatch(kind, peer)
            except Exception:
                self._complain(f"handling a {kind} event")
                self._contain(kind, peer)

    def _contain(self, kind: str, peer: Any) -> None:
        """After a failure: end the peer as if it had disconnected; stop watching an anchor that
        keeps failing (it would make a busy loop: it is looked at again when an instance comes or goes)."""
        try:
            if kind == "conn":
                self._disconnected(peer)  # forgets the peer even if deactivating it fails
            elif kind == "parked":
                self._watch_anchor(peer, False)
        except Exception:
            self._complain(f"recovering from a failed {kind} event")

    def _dispatch(self, kind: str, peer: Any) -> None:
        if kind == "accept":
            self._accept()
        elif kind == "wake":
            try:
                self._wake_r.recv(64)
            except BlockingIOError:
                pass
        elif kind == "conn":
            if peer.conn.fileno() < 0:
                return  # dropped earlier in this batch
            if peer.outbox:
                self._flush(peer)  # registered for writing only while replies wait
            else:
                self._on_readable(peer)
        elif kind == "parked":
            self._release_parked(peer)

    def run_timers(self) -> None:
        """The loop's periodic work; one that fails is logged, and the others still run."""
        for timer in (self.check_health, self._expire_outboxes, self._resume_accepting):
            try:
                timer()
            except Exception:
                self._complain(timer.__name__)

    def _complain(self, what: str) -> None:
        """Log the exception being handled: with its traceback at most once per COMPLAINT_INTERVAL per kind."""
        if self._rarely(what):
            log.exception("%s failed; the supervisor carries on", what)
        else:
            log.debug("%s failed again", what, exc_info=True)

    # -- control connections -----------------------------------------------------
    def _accept(self) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in FD_SHORTAGE:
                self._pause_accepting(exc)
            else:
                log.warning("accepting a control connection failed: %s", exc)
            return
        if self._fd_pauses:
            log.info("accepting control connections again (after %d pause(s) for want of file descriptors)",
                     self._fd_pauses)
            self._fd_pauses = 0
        try:
            self._admit(conn)
        except BaseException:
            if conn.fileno() not in self.instances:
                conn.close()
            raise

    def _admit(self, conn: socket.socket) -> None:
        """Serve a new peer, or tell it why not and close it at once."""
        conn.setblocking(False)  # a peer that does not read must never block the loop
        pid, uid, gid = _peercred(conn)
        refusal = self._refusal(conn, pid, uid, gid)
        code = "forbidden"
        if refusal is None:
            refusal, code = self._connection_cap(uid), "too_many_connections"
        if refusal:
            if self._rarely(f"refused uid {uid} {code}"):
                log.warning("refused control connection from pid %d uid %d: %s", pid, uid, refusal)
            try:
                protocol.send(conn, protocol.error_reply(code, refusal))
            except OSError:
                pass
            conn.close()
            return
        inst = Instance(id=next(self._ids), conn=conn, pid=pid, uid=uid)
        self._sel.register(conn, selectors.EVENT_READ, ("conn", inst))
        self.instances[conn.fileno()] = inst
        self._uid_connections[uid] += 1

    def _rarely(self, what: str) -> bool:
        """True at most once per COMPLAINT_INTERVAL per ``what``: for warnings a peer can repeat at will."""
        now = time.monotonic()
        if now - self._complaints.get(what, -COMPLAINT_INTERVAL) < COMPLAINT_INTERVAL:
            return False
        if len(self._complaints) > 1000:
            self._complaints.clear()
        self._complaints[what] = now
        return True

    def _connection_cap(self, uid: int) -> str | None:
        if uid == 0 or self._uid_connections[uid] < self.max_connections_per_uid:
            return None
        return (f"uid {uid} already holds {self._uid_connections[uid]} control connections to service "
                f"{self.service}, the most one user may (--max-connections-per-uid); close some first")

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors: stop accepting for a moment, keep serving the peers already connected."""
        if self._server is not None and self._server.fileno() in self._sel.get_map():
            self._sel.unregister(self._server)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
        self._fd_pauses += 1
        if self._fd_pauses == 1:
            log.warning("cannot accept a control connection: %s (%d open): not accepting new ones for %.1f s at a "
                        "time until some close; raise the supervisor's file limit (LimitNOFILE=) if this load is "
                        "legitimate", exc.strerror, len(self.instances), ACCEPT_PAUSE)

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is None or time.monotonic() < self._accept_paused_until:
            return
        self._accept_paused_until = None
        if self._server is not None:
            self._sel.register(self._server, selectors.EVENT_READ, ("accept", None))

    def _refusal(self, conn: socket.socket, pid: int, uid: int, gid: int) -> str | None:
        if uid == 0 or uid == os.geteuid():
            return None
        if self.gid is not None and self.gid in _peer_groups(conn, pid, gid):
            return None
        who = f"uid {uid}"
        group = f"group {self.group_name!r}" if self.group_name else "the supervisor's --group (none set)"
        return (f"{who} may not control service {self.service}: only root, the supervisor's own user, or "
                f"members of {group} may. Add the app's user to that group, or start the supervisor with --group.")

    def _on_readable(self, inst: Instance) -> None:
        try:
            raw, fds, truncated = protocol.recv(inst.conn)
        except BlockingIOError:
            return
        except OSError:
            raw, fds, truncated = b"", [], False
        if not raw and not fds and not truncated:
            self._disconnected(inst)
            return
        socks, junk = _adopt_fds(fds)
        try:
            if truncated:
                raise ProtocolError("too_large", f"message exceeds {protocol.MAX_MESSAGE} bytes or {protocol.MAX_FDS} fds")
            req = protocol.parse_request(raw, len(socks) + junk)
            if junk:
                raise ProtocolError("not_listening", f"{junk} of the file descriptors sent are not sockets")
            reply, out_fds = self._handle(inst, req, socks)
        except ProtocolError as exc:
            log.warning("%s: %s: %s", inst.describe(), exc.code, exc)
            reply, out_fds = protocol.error_reply(exc.code, str(exc)), []
        except ReuseportStandbyError as exc:
            log.warning("%s: %s", inst.describe(), exc)
            reply, out_fds = protocol.error_reply(type(exc).__name__, str(exc)), []
        except Exception as exc:  # one peer's trouble must never stop the broker for the others
            log.exception("%s: request failed", inst.describe())
            reply, out_fds = protocol.error_reply("internal", f"{type(exc).__name__}: {exc}"), []
        finally:
            for s in socks:
                s.close()  # never keep an fd an instance sent us
        self._reply(inst, reply, out_fds)

    def _reply(self, inst: Instance, reply: dict[str, Any], fds: list[int]) -> None:
        """Send a reply now, or queue what the peer's socket cannot take yet: never wait for a peer."""
        try:
            frames = protocol.frames(reply, fds)
        except (ProtocolError, TypeError, ValueError) as exc:
            log.error("%s: the reply to its request could not be encoded: %s", inst.describe(), exc)
            frames = protocol.frames(protocol.error_reply("internal", f"the reply could not be encoded: {exc}"))
        for n, (data, carried) in enumerate(frames):
            try:
                protocol.sendmsg(inst.conn, data, carried)
            except BlockingIOError:
                self._queue(inst, frames[n:])
                return
            except OSError:
                self._disconnected(inst)
                return

    def _queue(self, inst: Instance, frames: list[tuple[bytes, list[int]]]) -> None:
        """Keep the rest of a reply until the peer reads; read nothing more from it meanwhile.

        So a peer's queue holds at most one reply: its further requests wait in
        the kernel, charged to its own socket buffer.  The fds are duplicated:
        the originals (a pending instance's listeners) may close before it reads.
        """
        for data, carried in frames:
            dups: list[int] = []
            try:
                for fd in carried:
                    dups.append(os.dup(fd))
            except OSError as exc:
                _close_fds(dups)
                log.warning("%s: cannot keep its reply (%s): dropped", inst.describe(), exc.strerror)
                self._disconnected(inst)
                return
            inst.outbox.append((data, dups))
        inst.send_by = time.monotonic() + SEND_TIMEOUT
        self._sel.modify(inst.conn, selectors.EVENT_WRITE, ("conn", inst))

    def _flush(self, inst: Instance) -> None:
        """Send what waits for a peer; once all is taken, read its requests again."""
        while inst.outbox:
            data, carried = inst.outbox[0]
            try:
                protocol.sendmsg(inst.conn, data, carried)
            except BlockingIOError:
                return
            except OSError:
                self._disconnected(inst)
                return
            inst.outbox.popleft()
            _close_fds(carried)
        self._sel.modify(inst.conn, selectors.EVENT_READ, ("conn", inst))

    def _expire_outboxes(self) -> None:
        """Drop the peers that left a reply unread past SEND_TIMEOUT."""
        now = time.monotonic()
        for inst in [i for i in self.instances.values() if i.outbox and now > i.send_by]:
            waiting = sum(len(data) for data, _ in inst.outbox)
            log.warning("%s (uid %d) did not read its replies for %.1f s (%d byte(s) waiting): dropped",
                        inst.describe(), inst.uid, SEND_TIMEOUT, waiting)
            self._disconnected(inst)

    def _handle(self, inst: Instance, req: protocol.Request, socks: list[socket.socket]) -> tuple[dict[str, Any], list[int]]:
        if req.op == "ping":
            return {"ok": True}, []
        if req.op == "heartbeat":
            inst.last_heartbeat = time.monotonic()
            return {"ok": True, "state": inst.state}, []
        if req.op == "status":
            return {"ok": True, "status": self.status()}, []
        if req.op in protocol.ADMIN_OPS:
            return self._admin(inst, req), []
        if req.op == "hello":
            return self._hello(inst, req)
        if req.op == "readopt":
            return self._readopt(inst, req, socks), []
        if inst.role is None:
            raise ProtocolError("no_hello", f"'{req.op}' before 'hello': say who you are first")
        if req.op == "ready":
            return self._activate(inst), []
        if req.op == "stop":
            self._deactivate(inst, DRAINING)
            return {"ok": True, "state": inst.state}, []
        raise ProtocolError("unknown_op", req.op)  # unreachable: parse_request checks

    def _hello(self, inst: Instance, req: protocol.Request) -> tuple[dict[str, Any], list[int]]:
        if inst.role is not None:
            raise ProtocolError("already_registered", f"this connection is already {inst.describe()}")
        assert req.role is not None and req.pid is not None
        role = self._role_of_worker(req) or req.role
        self._check_room(role)
        parent_checked = req.parent is None or _may_be_child(inst.pid, req.parent)
        self._check_quota(inst, req, role, parent_checked)
        inst.role, inst.name, inst.heartbeat = role, req.name, req.heartbeat
        inst.scope, inst.parent, inst.parent_checked = req.scope, req.parent, parent_checked
        if req.pid != inst.pid:
            log.debug("instance %d says pid %d; the kernel says %d", inst.id, req.pid, inst.pid)
        created: list[socket.socket] = []
        try:
            for address in self.addresses:
                created.append(create_listener(address, self.backlog))
        except OSError as exc:
            for s in created:
                s.close()
            inst.role = None
            raise ReuseportStandbyError(f"could not create a listener: {exc}") from exc
        for address, sock in zip(self.addresses, created):
            inst.pending[address] = sock
            inst.cookies[address] = socket_cookie(sock)
        log.info("%s connected; handed out %d listener(s)", inst.describe(), len(created))
        return ({"ok": True, "instance": inst.id, "addresses": [str(a) for a in self.addresses],
                 "backlog": self.backlog, "cookies": [inst.cookies[a] for a in self.addresses]},
                [s.fileno() for s in created])

    # -- worker scope: an instance whose workers are instances of their own ----------------------
    def _head(self, worker: Instance) -> Instance | None:
        """The instance a worker belongs to (matched by pid: it survives a supervisor restart)."""
        if worker.parent is None:
            return None
        return next((i for i in self.instances.values() if i.pid == worker.parent and i.parent is None
                     and i.role is not None), None)

    def _workers(self, head: Instance) -> list[Instance]:
        return [i for i in self.instances.values() if i.parent == head.pid and i is not head]

    def _role_of_worker(self, req: protocol.Request) -> Role | None:
        """A worker serves its instance's role, which a promote may have swapped since that instance started."""
        if req.parent is None:
            return None
        head = self._head_pid(req.parent)
        return head.role if head is not None else None

    def _head_pid(self, pid: int) -> Instance | None:
        return next((i for i in self.instances.values() if i.pid == pid and i.parent is None and i.role is not None),
                    None)

    def _sync_head(self, head: Instance | None) -> None:
        """A worker-scope instance is active while any of its workers is (it holds no slot itself)."""
        if head is None or head.scope != "worker" or head.state not in (PENDING, ACTIVE):
            return
        state = ACTIVE if any(w.state == ACTIVE for w in self._workers(head)) else PENDING
        if state != head.state:
            head.state = state
            log.info("%s %s (through its workers)", head.describe(), "active" if state == ACTIVE else "has no active worker")

    def _range(self, role: Role) -> range:
        """Physical slots of a role: after a promote, the roles' ranges are swapped."""
        return slot_range(role.number ^ int(self.swapped))

    def _check_room(self, role: Role) -> None:
        for st in self.states.values():
            used = set(st.group.slots()) | self._reserved(st.address)
            if all(i in used for i in self._range(role)):
                raise SlotsFull(
                    f"all {len(self._range(role))} {role.value} slots of {st.address} are taken; "
                    f"stop an old {role.value} instance first")

    def _check_quota(self, inst: Instance, req: protocol.Request, role: Role, parent_checked: bool) -> None:
        """No uid but root holds more than two instances' worth of one role's slots.

        Else one user (any member of --group) could take every free slot of a
        role, and the next rolling reload of the real service would fail.  An
        instance's worth: the instance itself in instance scope; its workers
        (at most WORKERS_PER_INSTANCE) in worker scope.  A worker counts toward
        its instance only if it is that process's child (when the kernel lets
        us check); otherwise it counts as an instance of its own.
        """
        if inst.uid == 0:
            return
        head = self._head_pid(req.parent) if req.parent is not None and parent_checked else None
        if head is not None:
            workers = [w for w in self._workers(head) if w.state != DRAINING and w.parent_checked]
            if len(workers) >= WORKERS_PER_INSTANCE:
                raise ProtocolError("quota", f"{head.describe()} already has {len(workers)} workers registered, the "
                                    f"most one instance may have in worker scope ({WORKERS_PER_INSTANCE})")
            return
        held = [i for i in self.instances.values() if i.uid == inst.uid and i.role is role and i.state != DRAINING
                and i is not inst and (i.parent is None or not i.parent_checked or self._head(i) is None)]
        if len(held) >= INSTANCES_PER_ROLE_PER_UID:
            raise ProtocolError("quota", f"uid {inst.uid} already holds {len(held)} {role.value} instances "
                                f"({', '.join(str(i.id) for i in held)}), the most one user may (the two of a rolling "
                                f"restart): stop one first")

    def _reserved(self, address: Address) -> set[int]:
        return {i.slots[address] for i in self.instances.values() if address in i.slots}

    def _activate(self, inst: Instance) -> dict[str, Any]:
        assert inst.role is not None
        if inst.state == ACTIVE:
            return {"ok": True, "state": inst.state, "slots": {str(a): s for a, s in inst.slots.items()}}
        if not inst.pending:
            raise ProtocolError("no_sockets", "this instance holds no sockets the supervisor can activate "
                                "(after 'stop' an instance must reconnect to serve again)")
        head = self._head(inst)
        if head is not None and head.state == DRAINING:
            raise ProtocolError("draining", f"{head.describe()}, which this worker belongs to, is stopping")
        for address, sock in inst.pending.items():
            if not is_listening_tcp(sock):
                raise ProtocolError("not_listening", f"the {address} socket no longer listens")
        chosen: dict[Address, int] = {}
        try:
            for address, sock in inst.pending.items():
                st = self.states[address]
                slot = self._free_slot(st, inst.role)
                st.group.set_slot(slot, sock)
                chosen[address] = slot
        except BaseException:
            for address, slot in chosen.items():
                self.states[address].group.clear_slot(slot, inst.cookies[address])
            raise
        inst.slots = chosen
        inst.state = ACTIVE
        self._start_progress(inst)
        self._close_pending(inst)
        for address in chosen:
            st = self.states[address]
            self._update_live(st.group)
            self._release_parked(st)
        log.info("%s active in slots %s", inst.describe(), {str(a): s for a, s in chosen.items()})
        if head is not None and head.state in (DRAINED, DEMOTED):
            self._disable(inst, DRAINED)  # a worker of a drained instance (e.g. recycled) joins drained
        self._sync_head(head)
        return {"ok": True, "state": inst.state, "slots": {str(a): s for a, s in chosen.items()}}

    def _free_slot(self, st: AddressState, role: Role) -> int:
        used = set(st.group.slots()) | self._reserved(st.address)
        for i in self._range(role):
            if i not in used:
                return i
        raise SlotsFull(f"all {role.value} slots of {st.address} are taken")

    def _deactivate(self, inst: Instance, new_state: str) -> None:
        for address, slot in inst.slots.items():
            st = self.states[address]
            self._update_live(st.group, leaving=frozenset({slot}))
            if not st.group.clear_slot(slot, inst.cookies[address]):
                log.debug("%s: slot %d of %s was already empty", inst.describe(), slot, address)
            self._update_live(st.group)
            self._release_parked(st)
        if inst.slots:
            log.info("%s deactivated (%s)", inst.describe(), new_state)
        inst.slots = {}
        inst.state = new_state
        self._close_pending(inst)
        if inst.scope == "worker":
            # The instance stops (or its process died): all its workers leave at once, as one
            # instance-scope listener would; each then closes its own, and its queue migrates.
            workers = [w for w in self._workers(inst) if w.state != DRAINING]
            for worker in workers:
                self._deactivate(worker, DRAINING)
            if workers:
                log.info("%s: its %d worker(s) left the traffic with it (%s)", inst.describe(), len(workers), new_state)
        self._sync_head(self._head(inst))

    def _readopt(self, inst: Instance, req: protocol.Request, socks: list[socket.socket]) -> dict[str, Any]:
        """An instance that outlived a supervisor comes back with its sockets."""
        if inst.role is not None:
            raise ProtocolError("already_registered", f"this connection is already {inst.describe()}")
        assert req.role is not None
        if len(socks) != len(self.addresses):
            raise ProtocolError("address_mismatch", f"sent {len(socks)} sockets; this service has {len(self.addresses)} addresses "
                                "(the supervisor was restarted with other --bind addresses: restart the instance)")
        for address, sock in zip(self.addresses, socks):
            if not is_listening_tcp(sock):
                raise ProtocolError("not_listening", f"the socket sent for {address} is not a listening TCP socket")
            local = sock.getsockname()
            if (local[1] != address.port or sock.family != address.family
                    or ipaddress.ip_address(local[0]) != ipaddress.ip_address(address.host)):
                raise ProtocolError("address_mismatch", f"the socket sent for {address} is bound to {local[0]}:{local[1]}")
        inst.role, inst.name, inst.heartbeat = self._role_of_worker(req) or req.role, req.name, req.heartbeat
        inst.scope, inst.parent = req.scope, req.parent
        inst.parent_checked = req.parent is None or _may_be_child(inst.pid, req.parent)
        for address, sock in zip(self.addresses, socks):
            inst.cookies[address] = socket_cookie(sock)
        if req.active:
            found: dict[Address, int] = {}
            for address, sock in zip(self.addresses, socks):
                st = self.states[address]
                cookie = inst.cookies[address]
                slot = next((i for i, c in st.group.slots().items() if c == cookie), None)
                if slot is None:
                    slot = self._free_slot(st, req.role)
                    st.group.set_slot(slot, sock)
                found[address] = slot
            inst.slots, inst.state = found, ACTIVE
            # The slot says which role the instance serves now (a promote may have swapped it).
            first_slot = next(iter(found.values()))
            inst.role = Role.PRIMARY if first_slot in self._range(Role.PRIMARY) else Role.STANDBY
            if any(self.states[a].group.read_config().disabled >> s & 1 for a, s in found.items()):
                inst.state = DRAINED  # drained or demoted under the previous supervisor: an operator undrains
            self._start_progress(inst)
            for address in found:
                self._update_live(self.states[address].group)
                self._release_parked(self.states[address])
        else:
            # Not yet ready when the old supervisor went away: keep copies until it is.
            for address, sock in zip(self.addresses, socks):
                inst.pending[address] = socket.socket(fileno=os.dup(sock.fileno()))
            inst.state = PENDING
        self._sync_head(inst if inst.scope == "worker" else self._head(inst))
        log.info("re-adopted %s (%s)", inst.describe(), inst.state)
        return {"ok": True, "instance": inst.id, "state": inst.state,
                "slots": {str(a): s for a, s in inst.slots.items()}}

    def _disconnected(self, inst: Instance) -> None:
        """A dropped connection counts as ``stop``; the peer is forgotten even if deactivating fails."""
        if inst.conn.fileno() < 0:
            return  # already gone
        try:
            if inst.role is not None:
                log.info("%s disconnected", inst.describe())
            self._deactivate(inst, DRAINING)
        finally:
            self._unregister(inst)

    def _unregister(self, inst: Instance) -> None:
        fd = inst.conn.fileno()
        if fd >= 0 and self.instances.pop(fd, None) is not None:
            self._uid_connections[inst.uid] -= 1
            if self._uid_connections[inst.uid] <= 0:
                del self._uid_connections[inst.uid]
            self._sel.unregister(inst.conn)
        for _, carried in inst.outbox:
            _close_fds(carried)
        inst.outbox.clear()
        inst.conn.close()

    def _close_pending(self, inst: Instance) -> None:
        for sock in inst.pending.values():
            sock.close()
        inst.pending.clear()

    # -- slots and parking ----------------------------------------------------------
    def _update_live(self, group: Group, leaving: frozenset[int] = frozenset()) -> None:
        """Rebuild the program's live-slot table from the slots the kernel holds.

        ``leaving``: slots about to be cleared.  They leave the table first,
        so that no new or migrated connection is sent to a slot just emptied.
        """
        occupied = set(group.slots()) - leaving
        cfg = group.read_config()
        disabled = cfg.disabled
        for i in range(64):
            if disabled >> i & 1 and i not in occupied:
                disabled &= ~(1 << i)  # a slot the kernel emptied keeps no stale mark
        new = replace(cfg, disabled=disabled).with_live(occupied)
        if new != cfg:
            group.write_config(new)

    def _edit_config(self, group: Group, **changes: int) -> None:
        cfg = group.read_config()
        new = replace(cfg, **changes)
        if new != cfg:
            group.write_config(new)

    def _set_disabled(self, group: Group, slots: list[int], on: bool) -> None:
        cfg = group.read_config()
        mask = cfg.disabled
        for slot in slots:
            mask = mask | (1 << slot) if on else mask & ~(1 << slot)
        new = replace(cfg, disabled=mask).with_live(group.slots())
        if new != cfg:
            group.write_config(new)

    def _release_parked(self, st: AddressState) -> None:
        """Move what waits on the anchor to a live instance, if there is one.

        While some instance slot is live the anchor is watched: a connection
        that still lands on it (a handshake that began while nothing was
        live) is passed on at once.  With nothing live it is not watched, or
        the loop would spin on a readable anchor.
        """
        live = any(i != PARKING_SLOT for i in st.group.slots())
        self._watch_anchor(st, live)
        if not live:
            return
        parked = _queue_depth(st.anchor)
        if parked:
            requeue(st.anchor, self.backlog)
            self._fill_parking(st.group, st.anchor)
            log.info("%s: handed %d parked connection(s) to the active instance", st.address, parked)

    # -- operator commands --------------------------------------------------------------
    def _admin(self, caller: Instance, req: protocol.Request) -> dict[str, Any]:
        if req.op == "weight":
            assert req.standby_weight is not None
            for st in self.states.values():
                self._edit_config(st.group, standby_weight=req.standby_weight)
            log.info("standby weight set to %d%% by pid %d", req.standby_weight, caller.pid)
            return {"ok": True, "standby_weight": req.standby_weight}
        if req.op == "promote":
            return self._promote(caller)
        assert req.role is not None
        # Worker-scope instances hold no slot themselves: their state says whether workers that
        # activate later (recycled, added) join drained.
        heads = [i for i in self.instances.values() if i.role is req.role and i.scope == "worker"]
        targets = [i for i in self.instances.values() if i.role is req.role and i.slots]
        if req.op == "drain":
            targets = [i for i in targets if i.state == ACTIVE]
            if not targets:
                raise ProtocolError("no_instance", f"no active {req.role.value} instance to drain")
            for head in heads:
                if head.state == ACTIVE:
                    head.state = DRAINED
            for inst in targets:
                self._disable(inst, DRAINED)
                log.info("%s drained by pid %d", inst.describe(), caller.pid)
        else:  # undrain
            targets = [i for i in targets if i.state in (DRAINED, DEMOTED)]
            if not targets:
                raise ProtocolError("no_instance", f"no drained {req.role.value} instance to undrain")
            for head in heads:
                if head.state == DRAINED:
                    head.state = PENDING
            for inst in targets:
                self._enable(inst)
                log.info("%s undrained by pid %d", inst.describe(), caller.pid)
        return {"ok": True, "instances": [{"id": i.id, "pid": i.pid, "state": i.state} for i in targets]}

    def _promote(self, caller: Instance) -> dict[str, Any]:
        """Swap the roles of the running instances: one flag in the program, no socket moves."""
        live = {r: [i for i in self.instances.values() if i.role is r and i.state == ACTIVE] for r in Role}
        if not live[Role.STANDBY]:
            raise ProtocolError("no_instance", "no active standby to promote")
        self.swapped = not self.swapped
        for st in self.states.values():
            self._edit_config(st.group, flags=FLAG_SWAP_ROLES if self.swapped else 0)
        for inst in self.instances.values():
            if inst.role is not None:
                inst.role = inst.role.other
        log.info("promote by pid %d: instances %s are now primary", caller.pid,
                 [i.id for i in live[Role.STANDBY]])
        return {"ok": True, "swapped": self.swapped,
                "primary": [i.id for i in live[Role.STANDBY]], "standby": [i.id for i in live[Role.PRIMARY]]}

    def _disable(self, inst: Instance, state: str) -> None:
        for address, slot in inst.slots.items():
            self._set_disabled(self.states[address].group, [slot], True)
        inst.state = state
        self._sync_head(self._head(inst))

    def _enable(self, inst: Instance) -> None:
        for address, slot in inst.slots.items():
            self._set_disabled(self.states[address].group, [slot], False)
        inst.state = ACTIVE
        self._start_progress(inst)
        self._sync_head(self._head(inst))

    # -- health: hung instances ------------------------------------------------------------
    def _start_progress(self, inst: Instance) -> None:
        now = time.monotonic()
        inst.progress = {}
        for address, slot in inst.slots.items():
            hits = self.states[address].group.slot_hits([slot])[slot]
            inst.progress[address] = Progress(hits, 0, now)

    def check_health(self) -> None:
        """Demote an active instance that stopped accepting or stopped sending heartbeats."""
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + TICK
        watched = [i for i in self.instances.values() if i.state == ACTIVE and i.slots]
        demoted = [i for i in self.instances.values() if i.state == DEMOTED]
        if not watched and not demoted:
            return
        queues = _safe_queues() if self.stall_timeout and watched else {}
        for inst in watched:
            try:
                reason = self._hang_reason(inst, now, queues)
                if reason:
                    self._demote(inst, reason, queues)
            except Exception:  # one instance's trouble must not stop the checks of the others
                self._complain(f"health check of {inst.describe()}")
        for inst in demoted:
            try:
                self._maybe_recover(inst, now)
            except Exception:
                self._complain(f"recovery check of {inst.describe()}")

    def _hang_reason(self, inst: Instance, now: float, queues: dict[int, diag.ListenerQueue]) -> str:
        """Why an active instance counts as hung ("" if it does not)."""
        if inst.heartbeat and now - inst.last_heartbeat > max(3 * inst.heartbeat, 1.0):
            return f"no heartbeat for {now - inst.last_heartbeat:.1f} s"
        if self.stall_timeout and queues:
            for address, slot in inst.slots.items():
                q = queues.get(inst.cookies[address])
                hits = self.states[address].group.slot_hits([slot])[slot]
                stalled = inst.progress[address].update(hits, q.queued if q else 0, now)
                if stalled >= self.stall_timeout:
                    return f"{q.queued if q else 0} connection(s) waited {stalled:.1f} s on {address} with none accepted"
        return ""

    def _demote(self, inst: Instance, reason: str, queues: dict[int, diag.ListenerQueue]) -> None:
        self._disable(inst, DEMOTED)  # no new connection from here on
        inst.demoted_at = time.monotonic()
        inst.demotions += 1
        inst.demoted_for = reason
        self.demotions_total += 1
        log.warning("%s demoted: %s", inst.describe(), reason)
        for address, slot in inst.slots.items():
            self._hand_over_queue(inst, address, slot, queues.get(inst.cookies[address]))
        if self.on_hang in ("term", "kill"):
            sig = signal.SIGTERM if self.on_hang == "term" else signal.SIGKILL
            log.warning("%s: --on-hang=%s: sending %s", inst.describe(), self.on_hang, sig.name)
            if inst.pid <= 0:  # a peer in a PID namespace we cannot see: kill(0) would hit our own group
                log.warning("%s: its pid is not visible here; not signalling it", inst.describe())
                return
            for pid in [inst.pid, *_children(inst.pid)]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    log.warning("%s: no permission to send %s to pid %d (another uid needs CAP_KILL)",
                                inst.describe(), sig.name, pid)

    def _hand_over_queue(self, inst: Instance, address: Address, slot: int, q: diag.ListenerQueue | None) -> None:
        """Move what waits in a demoted instance's queue to the other instance.

        Borrow its listener (pidfd_getfd), shutdown() it — the kernel migrates
        the queue through the program, which skips the disabled slot — then
        listen() again and put it back in its (still disabled) slot, so the
        instance finds an empty, working listener if it recovers.
        """
        if q is None or q.inode == 0:
            return
        where = pidfd.find_socket_fd(inst.pid, q.inode)
        if where is None:
            log.warning("%s: could not find its %s listener in /proc to hand its queue over", inst.describe(), address)
            return
        try:
            borrowed = pidfd.borrow_socket(*where)
        except OSError as exc:
            log.warning("%s: cannot borrow its %s listener (%s): %d queued connection(s) stay with it until it "
                        "recovers or exits; give the supervisor CAP_SYS_PTRACE to hand them over",
                        inst.describe(), address, exc.strerror, q.queued)
            return
        st = self.states[address]
        try:
            borrowed.shutdown(socket.SHUT_RDWR)
            borrowed.listen(self.backlog)
            st.group.set_slot(slot, borrowed)
            log.info("%s: handed %d queued connection(s) on %s to the other instance", inst.describe(), q.queued, address)
        except OSError as exc:
            log.warning("%s: handing over the %s queue failed: %s", inst.describe(), address, exc)
        finally:
            borrowed.close()
        self._update_live(st.group)

    def _maybe_recover(self, inst: Instance, now: float) -> None:
        if self.on_hang != "demote":
            return
        cooldown = min(60.0, max(self.stall_timeout, 1.0) * 2 ** (inst.demotions - 1))
        if now - inst.demoted_at < cooldown:
            return
        if inst.heartbeat and inst.last_heartbeat <= inst.demoted_at:
            return  # still silent
        log.info("%s recovered; back in service (demoted %d time(s))", inst.describe(), inst.demotions)
        self._enable(inst)

    def _watch_anchor(self, st: AddressState, on: bool) -> None:
        try:
            self._sel.get_key(st.anchor)
            watched = True
        except KeyError:
            watched = False
        if on and not watched:
            self._sel.register(st.anchor, selectors.EVENT_READ, ("parked", st))
        elif watched and not on:
            self._sel.unregister(st.anchor)

    # -- status -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        queues = _safe_queues()
        addresses = []
        for st in self.states.values():
            addresses.append(address_status(st.address, st.group, queues, parking=socket_cookie(st.anchor),
                                             owners={inst.cookies[st.address]: inst.id for inst in self.instances.values()
                                                     if st.address in inst.cookies}))
        now = time.monotonic()
        return {
            "service": self.service,
            "supervisor": {"pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1),
                           "control": self.control_path, "pin_dir": str(self.pin_dir),
                           "stall_timeout_s": self.stall_timeout, "on_hang": self.on_hang,
                           "demotions": self.demotions_total},
            "roles_swapped": self.swapped,
            "addresses": addresses,
            "instances": [
                {"id": i.id, "role": i.role.value if i.role else None, "pid": i.pid, "uid": i.uid, "name": i.name,
                 "state": i.state, "since": round(i.since, 3), "scope": i.scope, "parent": i.parent,
                 "slots": {str(a): s for a, s in i.slots.items()},
                 "queues": {str(a): _queue_dict(queues.get(c)) for a, c in i.cookies.items()},
                 "heartbeat_age_s": round(now - i.last_heartbeat, 2) if i.heartbeat else None,
                 "demotions": i.demotions, "demoted_for": i.demoted_for or None}
                for i in self.instances.values() if i.role is not None
            ],
        }


def address_status(address: Address, group: Group, queues: dict[int, diag.ListenerQueue], *,
                   parking: int | None = None, owners: dict[int, int] | None = None) -> dict[str, Any]:
    """What one group's maps and the kernel's queues say; shared by live and offline status."""
    owners = owners or {}
    slots = group.slots()
    cfg = group.read_config()
    park_cookie = slots.get(PARKING_SLOT, parking)
    swapped = cfg.swapped
    hits = group.slot_hits(sorted(slots))

    def role_of(i: int) -> str:
        return "primary" if (i >= Role.STANDBY.slot_range[0]) == swapped else "standby"

    return {
        "address": str(address),
        "mode": "select_or_migrate" if group.migrate else "select",
        "prog_id": group.prog_info.id if group.prog_fd >= 0 else None,
        "standby_weight": cfg.standby_weight,
        "roles_swapped": swapped,
        "live": {"range0": list(cfg.live[0]), "range1": list(cfg.live[1])},
        "parking": {"slotted": PARKING_SLOT in slots, **_queue_dict(queues.get(park_cookie) if park_cookie else None)},
        "slots": [
            {"slot": i, "role": role_of(i), "cookie": c, "instance": owners.get(c),
             "disabled": bool(cfg.disabled >> i & 1), "connections": hits.get(i, 0), **_queue_dict(queues.get(c))}
            for i, c in sorted(slots.items()) if i != PARKING_SLOT
        ],
        "counters": group.counters().as_dict(),
    }


def _queue_dict(q: diag.ListenerQueue | None) -> dict[str, Any]:
    return {"queued": q.queued, "backlog": q.backlog} if q else {"queued": None, "backlog": None}


def _safe_queues() -> dict[int, diag.ListenerQueue]:
    try:
        return diag.listeners()
    except OSError as exc:
        log.debug("sock_diag unavailable: %s", exc)
        return {}


def _queue_depth(listener: socket.socket) -> int:
    q = _safe_queues().get(socket_cookie(listener))
    return q.queued if q else 0


def _adopt_fds(fds: list[int]) -> tuple[list[socket.socket], int]:
    """Wrap received fds as sockets; close (and count) any that are not sockets."""
    socks, junk = [], 0
    for fd in fds:
        try:
            socks.append(socket.socket(fileno=fd))
        except OSError:
            os.close(fd)
            junk += 1
    return socks, junk


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _may_be_child(pid: int, parent: int) -> bool:
    """False only when /proc shows that ``pid`` is not a child of ``parent`` (a peer in a PID namespace we
    cannot see has pid 0, and passes: nothing to check against)."""
    if pid <= 0:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return True


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    import struct

    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


SO_PEERGROUPS = 59


def _peer_groups(conn: socket.socket, pid: int, gid: int) -> set[int]:
    """The peer's groups as the kernel recorded them at connect (SO_PEERGROUPS, Linux 4.13+).

    Unlike /proc/PID, this works for a peer in a PID namespace we cannot see
    (a sibling container), whose pid reads as 0."""
    import struct

    groups = {gid}
    size = 4 * 64
    for _ in range(3):
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than room
                size *= 4
                continue
            return groups | _process_groups(pid)
        return groups | set(struct.unpack(f"{len(raw) // 4}I", raw))
    return groups | _process_groups(pid)


def _give_to_group(path: str | Path, gid: int, name: str | None) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise ReuseportStandbyError(
            f"cannot give {path} to group {name or gid}: without CAP_CHOWN the supervisor can only hand files to "
            f"a group it belongs to. Add it to the group (systemd: SupplementaryGroups={name or gid}; Kubernetes: "
            f"fsGroup) or drop --group") from None


def _process_groups(pid: int) -> set[int]:
    """Primary and supplementary groups of a live process (what the kernel checks, not /etc/group)."""
    groups: set[int] = set()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Gid:"):
                groups.update(int(x) for x in line.split()[1:])
            elif line.startswith("Groups:"):
                groups.update(int(x) for x in line.split()[1:])
    except OSError:
        pass
    return groups


def _resolve_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"unknown group {name!r} for --group: create it (groupadd) or give a numeric gid") from None


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state when it asked to be told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", path, exc)

