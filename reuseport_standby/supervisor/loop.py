"""The supervisor's event loop: control connections, their replies, and the periodic checks.

It is the only privileged process.  Every peer is non-blocking and gets
at most one reply queued (its further requests wait in the kernel, charged
to its own socket buffer), with a deadline: a peer that does not read is
dropped, never waited for.  Running out of file descriptors pauses
accepting, not serving.  A failure while handling one event ends that
request or that peer, never the loop.

Crash safety comes from the kernel: the group and its program live as long
as any member socket, and the maps are pinned.  A restarted supervisor
re-opens the pins and finds the slots as the kernel kept them; instances
reconnect and re-announce their sockets (``readopt``).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any

from .. import protocol
from ..errors import ProtocolError, ReuseportStandbyError
from ..kernel.group import Group
from ..kernel.sockets import Address
from . import peers
from .broker import AddressState, Broker, OpenGroup, ReadQueues, kernel_queues
from .options import SuperviseOptions
from .registry import Instance

log = logging.getLogger("reuseport_standby.supervisor")

TICK = 0.1  # seconds between health checks
#: seconds a peer has to take a reply its socket buffer could not hold; then it is dropped, never waited for
SEND_TIMEOUT = 2.0
#: seconds without accepting after running out of file descriptors (the peers already connected are served)
ACCEPT_PAUSE = 0.5
FD_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
COMPLAINT_INTERVAL = 10.0  # seconds: the same failure is logged with its traceback at most this often


class Supervisor:
    """Brokers one service's listeners; run with :meth:`serve_forever`.

    ``open_group`` and ``queues`` are the kernel edge (default: the pinned
    BPF maps and sock_diag); the fast tests give in-memory stand-ins.
    """

    def __init__(self, options: SuperviseOptions, *, open_group: OpenGroup | None = None,
                 queues: ReadQueues = kernel_queues) -> None:
        self.options = options.check()
        self.service = options.service
        self.addresses: list[Address] = list(options.binds)
        self.control_path = options.control_path
        self.gid = peers.resolve_group(options.group) if options.group else None
        self.pin_dir = Path(options.pin_root) / options.service
        self.broker = Broker(options.service, self.addresses, backlog=options.backlog,
                             open_group=open_group or self._open_pinned_group, queues=queues,
                             stall_timeout=options.stall_timeout, on_hang=options.on_hang)
        self.broker.about = {"control": self.control_path, "pin_dir": str(self.pin_dir)}
        self.broker.watch_anchor = self._watch_anchor
        self._peers: dict[int, Instance] = {}  # by control fd
        self._accept_paused_until: float | None = None
        self._fd_pauses = 0
        self._complaints: dict[str, float] = {}
        self._next_health = 0.0
        self._sel = selectors.DefaultSelector()
        self._server: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False

    # what other parts read
    @property
    def states(self) -> dict[Address, AddressState]:
        return self.broker.states

    @property
    def instances(self) -> list[Instance]:
        return list(self.broker.registry)

    def status(self) -> dict[str, Any]:
        from .view import status

        return status(self.broker)

    def _open_pinned_group(self, address: Address) -> Group:
        from ..kernel import pins

        o = self.options
        pin_dir = self.pin_dir / address.group_name
        pins.make_pin_dir(pin_dir, mount_bpffs=o.mount_bpffs, trusted=True)  # ours, or refused (docs/security.md)
        group = Group.open(pin_dir, migrate=o.migrate, mount_bpffs=o.mount_bpffs,
                           loader=o.loader, bpf_source=o.bpf_source)
        if self.gid is not None:
            group.share_read_only(self.gid)
        return group

    # -- life cycle ---------------------------------------------------------------
    #: the fd that holds the service's lock (kernel/pins.py lock_service) from start() to close(); the
    #: kernel lets go of it when the process ends, however it ends
    _service_lock: int | None = None

    def start(self) -> None:
        """Lock the service, load or re-adopt the pinned program and maps, open anchors, listen for instances.

        The lock comes first: a second supervisor of a running service must change nothing (the pinned
        program, the parking slot, the config) before it learns that it is the second."""
        from ..kernel import pins

        t0 = time.monotonic()
        # What this start creates below the pin root, removed again if it fails: a failed start leaves
        # the pins as it found them (a re-adopted service's pins are never touched).
        made = [path for path in (Path(self.options.pin_root), self.pin_dir,
                                  *(self.pin_dir / a.group_name for a in self.addresses)) if not os.path.lexists(path)]
        self.broker.may_adopt = lambda address: (self.pin_dir / address.group_name) not in made
        try:
            # Over the in-memory maps (the fast tests) there is no bpffs: the service's directory is made,
            # checked and locked below the pin root all the same.
            pinned = self.broker.open_group == self._open_pinned_group
            top = None if pinned else Path(os.path.abspath(self.options.pin_root)).parent
            try:
                self._service_lock = pins.lock_service(self.pin_dir, mount_bpffs=self.options.mount_bpffs, top=top)
            except pins.ServiceLocked as exc:
                holder = "" if exc.holder is None else f"pid {exc.holder}; "
                raise ReuseportStandbyError(
                    f"service {self.service} already has a supervisor ({holder}its control socket: {self.control_path}"
                    f", unless it was started with another --control); stop it first, or use another --service",
                    see="another-supervisor-serves-this-service") from None
            self.broker.open()
            self._server = self._bind_control()
        except BaseException:
            if self._service_lock is not None:  # ours to undo only while we hold the service's lock
                pins.remove_made(made)
            self.close()
            raise
        self._sel.register(self._server, selectors.EVENT_READ, ("accept", None))
        for st in self.states.values():
            self.broker.release_parked(st)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.broker.started_at = time.time()
        log.info("service %s ready on %s (control %s, %s, %s loader, %.1f ms)", self.service,
                 ", ".join(map(str, self.addresses)), self.control_path,
                 "select-or-migrate" if self.broker.migrating else "plain select (no migration)", self.options.loader,
                 (time.monotonic() - t0) * 1000)

    def _bind_control(self) -> socket.socket:
        server = protocol.listen_unix(self.control_path, "supervisor")
        if self.gid is not None:
            try:
                peers.give_to_group(self.control_path, self.gid, self.options.group)
            except BaseException:
                server.close()
                os.unlink(self.control_path)  # ours: bound just now (listen_unix never takes over another's)
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
        for inst in list(self._peers.values()):
            self._hang_up(inst)
        if self._server is not None:
            if self._server.fileno() in self._sel.get_map():
                self._sel.unregister(self._server)
            self._server.close()
            self._server = None
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        self.broker.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._service_lock is not None:  # last: another supervisor may start once we touch nothing more
            os.close(self._service_lock)
            self._service_lock = None

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
                self._drop(peer)  # forgets the peer even if deactivating it fails
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
            self.broker.release_parked(peer)

    def run_timers(self) -> None:
        """The loop's periodic work; one that fails is logged, and the others still run."""
        for timer in (self.check_health, self._expire_outboxes, self._resume_accepting):
            try:
                timer()
            except Exception:
                self._complain(timer.__name__)

    def check_health(self) -> None:
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + TICK
        try:
            self.broker.guard_program(now)  # first: nothing else this tick should run without our program
        except Exception:
            self._complain("re-attaching the program")
        self.broker.check_health(now, self._complain)

    def _complain(self, what: str) -> None:
        """Log the exception being handled: with its traceback at most once per COMPLAINT_INTERVAL per kind."""
        if self._rarely(what):
            log.exception("%s failed; the supervisor carries on", what)
        else:
            log.debug("%s failed again", what, exc_info=True)

    def _rarely(self, what: str) -> bool:
        """True at most once per COMPLAINT_INTERVAL per ``what``: for warnings a peer can repeat at will."""
        now = time.monotonic()
        if now - self._complaints.get(what, -COMPLAINT_INTERVAL) < COMPLAINT_INTERVAL:
            return False
        if len(self._complaints) > 1000:
            self._complaints.clear()
        self._complaints[what] = now
        return True

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
            if conn.fileno() not in self._peers:
                conn.close()
            raise

    def _admit(self, conn: socket.socket) -> None:
        """Serve a new peer, or tell it why not and close it at once."""
        conn.setblocking(False)  # a peer that does not read must never block the loop
        pid, uid, gid = peers.peercred(conn)
        refusal = self._refusal(conn, pid, uid, gid)
        code = "forbidden"
        if refusal is None:
            refusal = self.broker.registry.connection_refusal(uid, self.options.max_connections_per_uid, self.service)
            code = "too_many_connections"
        if refusal:
            if self._rarely(f"refused uid {uid} {code}"):
                log.warning("refused control connection from pid %d uid %d: %s", pid, uid, refusal)
            try:
                protocol.send(conn, protocol.error_reply(code, refusal))
            except OSError:
                pass
            conn.close()
            return
        # From what the kernel recorded at connect: operator rights, decided once; and the peer's pidfd, the
        # only handle it is ever signalled through (deferred where SO_PEERPIDFD can give it later; the
        # registry closes it when it forgets the peer).
        admin = peers.is_admin(conn, pid, uid, gid, self.options.admin_group)
        inst = self.broker.registry.new(conn, pid, uid, admin=admin, pidfd=peers.pidfd_at_connect(conn, pid))
        self._sel.register(conn, selectors.EVENT_READ, ("conn", inst))
        self._peers[conn.fileno()] = inst

    def _refusal(self, conn: socket.socket, pid: int, uid: int, gid: int) -> str | None:
        return peers.refusal(conn, pid, uid, gid, service=self.service, control_gid=self.gid,
                             group_name=self.options.group)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors: stop accepting for a moment, keep serving the peers already connected."""
        if self._server is not None and self._server.fileno() in self._sel.get_map():
            self._sel.unregister(self._server)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
        self._fd_pauses += 1
        if self._fd_pauses == 1:
            log.warning("cannot accept a control connection: %s (%d open): not accepting new ones for %.1f s at a "
                        "time until some close; raise the supervisor's file limit (LimitNOFILE=) if this load is "
                        "legitimate", exc.strerror, len(self._peers), ACCEPT_PAUSE)

    def _resume_accepting(self) -> None:
        if self._accept_paused_until is None or time.monotonic() < self._accept_paused_until:
            return
        self._accept_paused_until = None
        if self._server is not None:
            self._sel.register(self._server, selectors.EVENT_READ, ("accept", None))

    def _on_readable(self, inst: Instance) -> None:
        assert inst.conn is not None
        try:
            raw, fds, truncated = protocol.recv(inst.conn)
        except BlockingIOError:
            return
        except OSError:
            raw, fds, truncated = b"", [], False
        if not raw and not fds and not truncated:
            self._drop(inst)
            return
        socks, junk = _adopt_fds(fds)
        try:
            if truncated:
                raise ProtocolError("too_large", f"message exceeds {protocol.MAX_MESSAGE} bytes or {protocol.MAX_FDS} fds")
            req = protocol.parse_request(raw, len(socks) + junk)
            if junk:
                raise ProtocolError("not_listening", f"{junk} of the file descriptors sent are not sockets")
            reply, out_fds = self.broker.handle(inst, req, socks)
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
        assert inst.conn is not None
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
                self._drop(inst)
                return

    def _queue(self, inst: Instance, frames: list[tuple[bytes, list[int]]]) -> None:
        """Keep the rest of a reply until the peer reads; read nothing more from it meanwhile.

        So a peer's queue holds at most one reply: its further requests wait in
        the kernel, charged to its own socket buffer.  The fds are duplicated:
        the originals (a pending instance's listeners) may close before it reads.
        """
        assert inst.conn is not None
        for data, carried in frames:
            dups: list[int] = []
            try:
                for fd in carried:
                    dups.append(os.dup(fd))
            except OSError as exc:
                _close_fds(dups)
                log.warning("%s: cannot keep its reply (%s): dropped", inst.describe(), exc.strerror)
                self._drop(inst)
                return
            inst.outbox.append((data, dups))
        inst.send_by = time.monotonic() + SEND_TIMEOUT
        self._sel.modify(inst.conn, selectors.EVENT_WRITE, ("conn", inst))

    def _flush(self, inst: Instance) -> None:
        """Send what waits for a peer; once all is taken, read its requests again."""
        assert inst.conn is not None
        while inst.outbox:
            data, carried = inst.outbox[0]
            try:
                protocol.sendmsg(inst.conn, data, carried)
            except BlockingIOError:
                return
            except OSError:
                self._drop(inst)
                return
            inst.outbox.popleft()
            _close_fds(carried)
        self._sel.modify(inst.conn, selectors.EVENT_READ, ("conn", inst))

    def _expire_outboxes(self) -> None:
        """Drop the peers that left a reply unread past SEND_TIMEOUT."""
        now = time.monotonic()
        for inst in [i for i in self._peers.values() if i.outbox and now > i.send_by]:
            waiting = sum(len(data) for data, _ in inst.outbox)
            log.warning("%s (uid %d) did not read its replies for %.1f s (%d byte(s) waiting): dropped",
                        inst.describe(), inst.uid, SEND_TIMEOUT, waiting)
            self._drop(inst)

    def _drop(self, inst: Instance) -> None:
        """A peer is gone (or is sent away): it counts as ``stop``, and it is forgotten even if that fails."""
        try:
            self.broker.disconnected(inst)
        finally:
            self._hang_up(inst)

    def _hang_up(self, inst: Instance) -> None:
        """Close a peer's connection and what waited for it; forget it."""
        self.broker.registry.forget(inst)
        if inst.conn is None:
            return
        fd = inst.conn.fileno()
        if fd >= 0 and self._peers.pop(fd, None) is not None:
            self._sel.unregister(inst.conn)
        for _, carried in inst.outbox:
            _close_fds(carried)
        inst.outbox.clear()
        self.broker.close_pending(inst)
        inst.conn.close()

    def _watch_anchor(self, st: AddressState, on: bool) -> None:
        try:
            self._sel.get_key(st.anchor)
            watched = True
        except (KeyError, ValueError):
            watched = False
        if on and not watched:
            self._sel.register(st.anchor, selectors.EVENT_READ, ("parked", st))
        elif watched and not on:
            self._sel.unregister(st.anchor)


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
