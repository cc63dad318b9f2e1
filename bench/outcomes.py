"""What counting outcomes costs: CPU per request of a server with the recording wrapper, against the
same server without it, side by side in one run (issue 20, item 1: the target is at most 1 %).

    .venv/bin/python bench/outcomes.py [--seconds 2] [--rounds 10] [--cases gunicorn-hello,...]

Per case, two servers run all along on two loopback ports: the same server and app, one serving
``APP`` and the other ``APP_recorded`` (bench/outcomes_app.py: the app wrapped by
reuseport_standby.recording, as the integrations wrap it).  Each round loads one, then the other
(the order flips every round: ABBA...), for ``--seconds`` each, with the same closed-loop client
(``--clients`` threads; a new connection per request for gunicorn's sync worker, which closes every
connection anyway, keep-alive for uvicorn).  The servers' CPU time comes from
/proc/PID/task/*/schedstat (nanoseconds, every thread of the master and its workers), read before and
after each load.  Result: CPU per request of each, and their ratio, over all rounds, with the
spread of the per-round ratios.  No supervisor: the wrapper's cost is the same with or without one,
and the reports to the master and the supervisor go once a second, not per request.

Writes ``OUT/outcomes.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

#: case -> (server, app in bench/outcomes_app.py)
CASES = {
    "gunicorn-hello": ("gunicorn", "hello"),
    "gunicorn-flask": ("gunicorn", "flask"),
    "uvicorn-hello": ("uvicorn", "hello_asgi"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(server: str, app: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'bench'}"}
    if server == "gunicorn":
        cmd = [str(BIN / "gunicorn"), "--workers", "1", "--worker-class", "sync", "--bind", f"{HOST}:{port}",
               "--log-level", "warning", f"outcomes_app:{app}"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--host", HOST, "--port", str(port), "--no-access-log",
               "--log-level", "warning", "--lifespan", "off", "--loop", "asyncio", f"outcomes_app:{app}"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{' '.join(cmd)} did not answer within 30 s")


def tree(pid: int) -> set[int]:
    found, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in found:
                found.add(k)
                todo.append(k)
    return found


def cpu_ns(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                total += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total


REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
REQUEST_KEEP = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _read_response(sock: socket.socket, buf: bytearray) -> None:
    """One response with a Content-Length off a keep-alive connection (what is left stays in ``buf``)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    need = len(head) + 4 + length
    while len(buf) < need:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    del buf[:need]


def load(port: int, seconds: float, clients: int, keep_alive: bool) -> tuple[int, int]:
    """Closed loop: ``clients`` threads, each one request at a time, for ``seconds``; (answered, failed)."""
    stop = time.monotonic() + seconds
    done = [0] * clients
    failed = [0] * clients

    def one(i: int) -> None:
        sock: socket.socket | None = None
        buf = bytearray()
        while time.monotonic() < stop:
            try:
                if keep_alive:
                    if sock is None:
                        sock = socket.create_connection((HOST, port), timeout=5)
                        buf.clear()
                    sock.sendall(REQUEST_KEEP)
                    _read_response(sock, buf)
                else:
                    with socket.create_connection((HOST, port), timeout=5) as s:
                        s.sendall(REQUEST_CLOSE)
                        while s.recv(65536):
                            pass
                done[i] += 1
            except OSError:
                failed[i] += 1
                if sock is not None:
                    sock.close()
                    sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), sum(failed)


def wrapper_ns(server: str, app: str, repeats: int = 7, seconds: float = 0.3) -> float:
    """The wrapper's own cost per request, in this process: the app called as a server calls it, bare and
    wrapped, interleaved ``repeats`` times; the fastest timing of each (what the code costs when nothing else
    interferes, as timeit advises), their difference in ns."""
    import asyncio
    import timeit

    sys.path.insert(0, str(REPO / "bench"))
    import outcomes_app

    # The wrapper's work does not depend on the app's, only on its interface and body type: a flask
    # response body is an iterator (a generator frame of ours), hello's a list.  A cheap app of the same
    # kind shows it without the app's own noise.
    probe = {"hello": "hello", "flask": "hello_stream", "hello_asgi": "hello_asgi"}[app]
    bare, wrapped = getattr(outcomes_app, probe), getattr(outcomes_app, f"{probe}_recorded")
    diffs: list[tuple[float, float]] = []
    if server == "gunicorn":
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "bench", "SERVER_PORT": "80",
                   "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": None}

        def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
            return None

        def serve(a: Any) -> None:
            body = a(dict(environ), start_response)
            for _ in body:
                pass
            if hasattr(body, "close"):
                body.close()

        n = max(1000, int(seconds / (timeit.timeit(lambda: serve(bare), number=1000) / 1000)))
        for _ in range(repeats):
            diffs.append((timeit.timeit(lambda: serve(bare), number=n) / n,
                          timeit.timeit(lambda: serve(wrapped), number=n) / n))
    else:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            return None

        async def loop(a: Any, n: int) -> float:
            scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
            t = time.perf_counter()
            for _ in range(n):
                await a(scope, receive, send)
            return time.perf_counter() - t

        n = max(1000, int(seconds / (asyncio.run(loop(bare, 1000)) / 1000)))
        for _ in range(repeats):
            diffs.append((asyncio.run(loop(bare, n)) / n, asyncio.run(loop(wrapped, n)) / n))
    return (min(w for _, w in diffs) - min(b for b, _ in diffs)) * 1e9


def measure(server: str, app: str, args: argparse.Namespace) -> dict[str, Any]:
    keep_alive = server == "uvicorn"
    procs = {"bare": start(server, app, free_port()), "recorded": start(server, f"{app}_recorded", free_port())}
    ports = {name: int(p.args[p.args.index("--bind") + 1].rsplit(":", 1)[1]) if server == "gunicorn"
             else int(p.args[p.args.index("--port") + 1]) for name, p in procs.items()}
    try:
        for name in procs:  # warm up (imports, first-request caches)
            load(ports[name], 1.0, args.clients, keep_alive)
        rounds = []
        for r in range(args.rounds):
            order = ("bare", "recorded") if r % 2 == 0 else ("recorded", "bare")
            row: dict[str, Any] = {}
            for name in order:
                before = cpu_ns(procs[name].pid)
                answered, failed = load(ports[name], args.seconds, args.clients, keep_alive)
                row[name] = {"requests": answered, "failed": failed, "cpu_ns": cpu_ns(procs[name].pid) - before}
            row["ratio"] = ((row["recorded"]["cpu_ns"] / row["recorded"]["requests"])
                            / (row["bare"]["cpu_ns"] / row["bare"]["requests"]))
            # the same, both loaded at once: whatever else the machine does in this interval, both get it
            before = {name: cpu_ns(p.pid) for name, p in procs.items()}
            out: dict[str, tuple[int, int]] = {}
            threads = [threading.Thread(target=lambda n=name: out.__setitem__(
                n, load(ports[n], args.seconds, args.clients, keep_alive))) for name in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for name, p in procs.items():
                row[f"{name}_together"] = {"requests": out[name][0], "failed": out[name][1],
                                           "cpu_ns": cpu_ns(p.pid) - before[name]}
            row["ratio_together"] = ((row["recorded_together"]["cpu_ns"] / row["recorded_together"]["requests"])
                                     / (row["bare_together"]["cpu_ns"] / row["bare_together"]["requests"]))
            rounds.append(row)
            print(f"  round {r + 1}: bare {row['bare']['cpu_ns'] / row['bare']['requests'] / 1000:.1f} µs/req, "
                  f"recorded {row['recorded']['cpu_ns'] / row['recorded']['requests'] / 1000:.1f} µs/req, "
                  f"ratio {row['ratio']:.4f}; together {row['ratio_together']:.4f}", flush=True)
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
            p.wait(10)

    def per_request(name: str) -> float:
        return sum(r[name]["cpu_ns"] for r in rounds) / sum(r[name]["requests"] for r in rounds)

    ratios = [r["ratio"] for r in rounds]
    together = [r["ratio_together"] for r in rounds]
    micro = wrapper_ns(server, app)  # in the same run, right after the loads
    bare_ns = (per_request("bare") + per_request("bare_together")) / 2
    return {"server": server, "app": app, "keep_alive": keep_alive, "rounds": rounds,
            "bare_us_per_request": per_request("bare") / 1000, "recorded_us_per_request": per_request("recorded") / 1000,
            "ratio": per_request("recorded") / per_request("bare"),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_together": per_request("recorded_together") / per_request("bare_together"),
            "ratio_together_median": statistics.median(together),
            "ratio_together_min": min(together), "ratio_together_max": max(together),
            "wrapper_ns": micro, "wrapper_share": micro / bare_ns,
            "failed": sum(r[n]["failed"] for r in rounds
                          for n in ("bare", "recorded", "bare_together", "recorded_together"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="load per server per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=2, help="client threads (closed loop)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    results = []
    for case in args.cases.split(","):
        server, app = CASES[case]
        print(f"{case}:", flush=True)
        results.append({"case": case, **measure(server, app, args)})
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()},
           "seconds": args.seconds, "rounds": args.rounds, "clients": args.clients, "results": results}
    (args.out / "outcomes.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("\n| case | bare µs CPU/req | recorded µs CPU/req | ratio, alternating: all rounds; median [min, max] "
          "| ratio, together: all rounds; median [min, max] | wrapper ns/req (in process) | wrapper / bare CPU |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['bare_us_per_request']:.1f} | {r['recorded_us_per_request']:.1f} | "
              f"{r['ratio']:.4f}; {r['ratio_median']:.4f} [{r['ratio_min']:.4f}, {r['ratio_max']:.4f}] | "
              f"{r['ratio_together']:.4f}; {r['ratio_together_median']:.4f} [{r['ratio_together_min']:.4f}, "
              f"{r['ratio_together_max']:.4f}] | {r['wrapper_ns']:.0f} | {r['wrapper_share']:.2%} |")
    print("\nfailed requests:", sum(r["failed"] for r in results))
    print(f"\nwritten: {args.out / 'outcomes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
