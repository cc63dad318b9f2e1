"""A bounded HTTP load client that counts every failure by kind.

Used by the demo, the tests and the benchmark: a fixed number of threads,
each opening a new TCP connection per request (the case restarts hurt
most), for at most ``duration`` seconds and ``max_requests`` requests.
It only ever targets the address it is given; callers keep that on
loopback or in a network namespace they created.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple


class RequestRecord(NamedTuple):
    """One request, when ``Load(..., request_ids=True)``: what the benchmark needs to classify a loss."""

    id: int  #: sent as ``id=N`` in the query string, so the server can record what it received
    sent: float  #: CLOCK_MONOTONIC
    ended: float
    kind: str  #: "ok" or the failure kind
    answer: str  #: the response body (stripped, at most 80 characters): the demo apps answer "<role> <pid>"
    reused: bool  #: sent on a keep-alive connection that had already carried a request
    port: int = 0  #: the connection's local (client) port, 0 if it never connected


@dataclass
class LoadResult:
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    max_latency: float = 0.0
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    #: (seconds since start, outcome, first word of the body: who answered) per request, when asked for
    events: list[tuple[float, str, str]] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    # (sent, ended, kind) of every failed request, CLOCK_MONOTONIC: lets a
    # caller tell which restart a failure belongs to.
    failure_events: list[tuple[float, float, str]] = field(default_factory=list)
    #: every request, in completion order, when ``request_ids=True``
    requests: list[RequestRecord] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> str:
        fails = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())) or "none"
        rate = self.total / self.elapsed if self.elapsed else 0.0
        return (f"{self.total} requests in {self.elapsed:.1f} s ({rate:.0f}/s): {self.ok} ok, failed: {fails}; "
                f"p50 {self.percentile(0.5) * 1000:.1f} ms, p99 {self.percentile(0.99) * 1000:.1f} ms, "
                f"max {self.max_latency * 1000:.0f} ms")


def one_request(host: str, port: int, path: str = "/", timeout: float = 5.0,
                sock: socket.socket | None = None) -> tuple[str, socket.socket | None]:
    """One HTTP/1.1 request; returns ("ok" | failure kind, reusable socket or None)."""
    kind, sock, _ = exchange(host, port, path, timeout, sock)
    return kind, sock


def exchange(host: str, port: int, path: str = "/", timeout: float = 5.0,
             sock: socket.socket | None = None, *,
             on_connect: Callable[[socket.socket], None] | None = None) -> tuple[str, socket.socket | None, bytes]:
    """Like :func:`one_request`, also returning the response body.

    ``on_connect`` is called with the new socket once it is connected (not for a given ``sock``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    keep = sock is not None
    try:
        if sock is None:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((host, port))
            except ConnectionRefusedError:
                sock.close()
                return "refused", None, b""
            if on_connect is not None:
                on_connect(sock)
        conn_hdr = "keep-alive" if keep else "close"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn_hdr}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                sock.close()
                return ("eof" if not data else "truncated"), None, b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        length = None
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        if length is not None:
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    sock.close()
                    return "truncated", None, b""
                body += chunk
        code = int(status_line[1]) if len(status_line) > 1 else 0
        reusable = keep and length is not None and b"connection: close" not in head.lower()
        if not reusable:
            sock.close()
            sock = None
        return ("ok" if 200 <= code < 300 else f"http_{code}"), sock, body
    except ConnectionResetError:
        sock.close()  # type: ignore[union-attr]
        return "reset", None, b""
    except socket.timeout:
        sock.close()  # type: ignore[union-attr]
        return "timeout", None, b""
    except OSError as exc:
        if sock is not None:
            sock.close()
        return type(exc).__name__, None, b""


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive connection with anything to read (EOF, a reset) is one the server has dropped."""
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLRDHUP | select.POLLERR | select.POLLHUP)
    return bool(p.poll(0))


class Load:
    """Run load in background threads: ``with Load(...) as load: ...; result = load.result``."""

    def __init__(self, host: str, port: int, *, concurrency: int = 8, duration: float = 10.0,
                 max_requests: int = 200_000, path: str = "/", keepalive: bool = False, timeout: float = 5.0,
                 record_latencies: bool = True, record_events: bool = False, request_ids: bool = False,
                 id_base: int = 0, requests_per_connection: int = 0, reuse_check: bool = False) -> None:
        """``request_ids``: give every request a unique ``id=N`` (N from ``id_base`` up) in its query
        string and keep a :class:`RequestRecord` of each in ``result.requests``.

        With ``keepalive``: ``requests_per_connection`` > 0 closes a connection after that many
        requests and opens a new one (as connection pools recycle theirs); ``reuse_check`` polls an
        idle connection before reusing it and opens a new one if the server has closed it (as
        urllib3 does), instead of sending a request into a connection that is already gone."""
        self.host, self.port, self.path = host, port, path
        self.concurrency = concurrency
        self.duration = duration
        self.max_requests = max_requests
        self.keepalive = keepalive
        self.timeout = timeout
        self.record = record_latencies
        self.record_events = record_events
        self.request_ids = request_ids
        self.id_base = id_base
        self.requests_per_connection = requests_per_connection
        self.reuse_check = reuse_check
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._issued = 0

    def _take(self) -> bool:
        return self._take_id() is not None

    def _take_id(self) -> int | None:
        """The next request's sequence number, or None once ``max_requests`` were issued."""
        with self._lock:
            if self._issued >= self.max_requests:
                return None
            self._issued += 1
            return self._issued - 1

    def _path_for(self, seq: int) -> str:
        if not self.request_ids:
            return self.path
        return f"{self.path}{'&' if '?' in self.path else '?'}id={self.id_base + seq}"

    def _trace(self, seq: int, t0: float, ended: float, kind: str, body: bytes, reused: bool, port: int) -> None:
        if not self.request_ids:
            return
        answer = body[:80].decode(errors="replace").strip()
        with self._lock:
            self.result.requests.append(RequestRecord(self.id_base + seq, t0, ended, kind, answer, reused, port))

    def _record(self, kind: str, dt: float, body: bytes = b"") -> None:
        now = time.monotonic()
        who = body.split(b" ", 1)[0].decode(errors="replace") if body else ""
        with self._lock:
            if kind == "ok":
                self.result.ok += 1
                self.result.served_by[who] += 1
            else:
                self.result.failures[kind] += 1
                self.result.failure_events.append((now - dt, now, kind))
            if self.record_events:
                self.result.events.append((now - self._start, kind, who))
            self.result.max_latency = max(self.result.max_latency, dt)
            if self.record:
                self.result.latencies.append(dt)

    def _connect(self) -> tuple[socket.socket | None, str]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect((self.host, self.port))
            return s, "ok"
        except ConnectionRefusedError:
            s.close()
            return None, "refused"
        except socket.timeout:
            s.close()
            return None, "timeout"
        except OSError as exc:
            s.close()
            return None, type(exc).__name__

    def _worker(self) -> None:
        deadline = self._start + self.duration
        sock: socket.socket | None = None
        carried = 0  # requests the keep-alive socket in hand has carried
        port = 0  # local port of the connection in use

        def connected(s: socket.socket) -> None:
            nonlocal port
            port = s.getsockname()[1]

        while not self._stop.is_set() and time.monotonic() < deadline:
            seq = self._take_id()
            if seq is None:
                break
            t0 = time.monotonic()
            if sock is not None and ((self.requests_per_connection and carried >= self.requests_per_connection)
                                     or (self.reuse_check and _closed_by_peer(sock))):
                sock.close()
                sock = None
            if sock is None:
                port = 0
            if self.keepalive and sock is None:
                sock, kind = self._connect()
                carried = 0
                if sock is None:
                    ended = time.monotonic()
                    self._record(kind, ended - t0)
                    self._trace(seq, t0, ended, kind, b"", False, 0)
                    continue
                connected(sock)
            reused = carried > 0
            kind, sock, body = exchange(self.host, self.port, self._path_for(seq), self.timeout, sock,
                                        on_connect=connected if self.request_ids else None)
            carried = carried + 1 if sock is not None else 0
            ended = time.monotonic()
            self._record(kind, ended - t0, body)
            self._trace(seq, t0, ended, kind, body, reused, port)
        if sock is not None:
            sock.close()

    def start(self) -> "Load":
        self._start = time.monotonic()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._worker, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        self.result.elapsed = time.monotonic() - self._start
        return self.result

    def wait(self) -> LoadResult:
        for t in self._threads:
            t.join(self.duration + self.timeout + 5)
        return self.stop()

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
