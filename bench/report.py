"""Markdown tables and a PNG chart from bench/restarts.py's JSON results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND_NAMES = {"term": "SIGTERM", "kill": "SIGKILL", "hup": "SIGHUP"}
MAIN_KINDS = ("refused", "reset", "eof", "timeout")
COLORS = {"reuseport-standby": "#2f6db5", "sockarray-select": "#f0a030", "plain-reuseport": "#8c564b",
          "single-hup": "#7f7f7f"}


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    return [(key, entry, variant, r) for key, entry in results["contenders"].items()
            for variant, r in entry.get("variants", {}).items()]


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _restarts(entry: dict[str, Any], r: dict[str, Any]) -> str:
    kinds = r.get("by_restart_kind", {})
    return " + ".join(f"{v['restarts']} {KIND_NAMES.get(k, k)}" for k, v in kinds.items()) or "0"


def failures_table(results: dict[str, Any]) -> str:
    rows = []
    for key, entry, variant, r in _rows(results):
        fk = r["failures_by_kind"]
        other = sum(v for k, v in fk.items() if k not in MAIN_KINDS)
        rows.append([key, variant, _restarts(entry, r), r["requests"], r["failed"],
                     *(fk.get(k, 0) for k in MAIN_KINDS), other, f"**{r['lost_connection_level']}**",
                     r["failed_on_reused_keepalive"], f"{r['lost_in_worker']} ({r['lost_in_worker_in_app']})",
                     r["lost_never_reached_app"]])
    return _table(["contender", "load", "restarts", "requests", "failed", *MAIN_KINDS, "other",
                   "lost at connection level", "closed between keep-alive requests", "lost inside workers (in the app)",
                   "never reached the app"], rows)


def latency_table(results: dict[str, Any]) -> str:
    rows = []
    for key, entry, variant, r in _rows(results):
        lat = r["latency_ms"]
        share = ", ".join(f"{role} {100 * v:.1f}%" for role, v in r["share"].items())
        rows.append([key, variant, f"{r['throughput_rps']:.0f}", f"{lat['p50']:.1f}", f"{lat['p99']:.1f}",
                     f"{lat['p99_9']:.1f}", f"{lat['max']:.0f}", share])
    return _table(["contender", "load", "ok req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "answered by"], rows)


def kernel_table(results: dict[str, Any]) -> str:
    rows = []
    for key, entry, variant, r in _rows(results):
        n = r["nstat"]
        pc = r.get("program_counters") or {}
        prog = (f"migrated {pc.get('migrated_primary', 0) + pc.get('migrated_standby', 0) + pc.get('migrated_parked', 0)}, "
                f"fell back {pc.get('fell_back', 0) + pc.get('migrate_fell_back', 0)}") if pc else "—"
        rows.append([key, variant, n.get("TcpExtListenDrops", 0), n.get("TcpExtListenOverflows", 0),
                     n.get("TcpExtTCPMigrateReqSuccess", 0), n.get("TcpExtTCPMigrateReqFailure", 0),
                     n.get("TcpOutRsts", 0), n.get("TcpExtTCPAbortOnClose", 0),
                     n.get("TcpOutRsts", 0) - n.get("TcpExtTCPAbortOnClose", 0), prog])
    return _table(["contender", "load", "ListenDrops", "ListenOverflows", "TCPMigrateReqSuccess",
                   "TCPMigrateReqFailure", "OutRsts", "of which TCPAbortOnClose", "other RSTs",
                   "program counters"], rows)


def per_restart_table(results: dict[str, Any]) -> str:
    rows = []
    for key, entry, variant, r in _rows(results):
        cells = []
        for k, v in r.get("by_restart_kind", {}).items():
            n = max(v["restarts"], 1)
            cells.append(f"{KIND_NAMES.get(k, k)}: {v['connection'] / n:.1f} / {v['reused_keepalive'] / n:.1f} / "
                         f"{v['in_worker'] / n:.1f}")
        waits = [s["serving_after"] for s in r.get("steps", [])]
        gaps = [b["at"] - a["at"] for a, b in zip(r.get("steps", []), r.get("steps", [])[1:])]
        rows.append([key, variant, "; ".join(cells) or "—",
                     f"{sum(waits) / len(waits):.2f}" if waits else "—",
                     f"{sum(gaps) / len(gaps):.2f}" if gaps else "—"])
    return _table(["contender", "load", "per restart: connection-level / keep-alive close race / in workers",
                   "restart to serving, s (mean)", "interval between restarts, s (mean)"], rows)


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    v = m.get("versions", {})
    out = [f"# Restarts under load: {m['server']}\n",
           f"`{m['command']}`\n",
           f"{m['started']}; kernel {m['kernel']}, {m['cpus']} CPUs (shared; load average before "
           f"{m['loadavg_before'][0]:.1f}, after {m.get('loadavg_after', [0])[0]:.1f}); Python {m['python']}, "
           + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; run took {m.get('duration_s', 0):.0f} s"
           + ("; in a private network namespace" if m.get("netns") else "") + "."
           + (f" Code: commit {m['source']['commit']}" + (f" with {len(m['source']['modified'])} modified files ("
              + ", ".join(m['source']['modified']) + ")" if m['source']['modified'] else "") + "."
              if m.get("source", {}).get("commit") else "") + "\n",
           f"App: the bundled demo app behind bench/app.py ({m['app_sleep_ms']:g} ms of work per request), "
           f"{m['workers']} workers per instance. Load: {m['concurrency']} client threads, timeout "
           f"{m['timeout_s']:g} s. Restarts: primary SIGTERM and SIGKILL (whole process group) alternately "
           f"(single-hup: SIGHUP), every {m['period_s']:g} s or {m['min_gap_s']:g} s after the new primary "
           f"serves, whichever is later.\n"]
    if m.get("interrupted"):
        out.append("**Interrupted: partial results.**\n")
    if m.get("skipped"):
        out.append(f"**Skipped (past --max-minutes): {', '.join(m['skipped'])}.**\n")
    for key, entry in results["contenders"].items():
        if entry.get("error"):
            out.append(f"**{key}: {entry['error']}**\n")
        for variant, r in entry.get("variants", {}).items():
            if r.get("error"):
                out.append(f"**{key} / {variant}: {r['error']}**\n")
    out += ["## Failures\n",
            "*Lost at connection level*: a request on a new connection that no worker ever accepted (refused, "
            "or reset in a listener's queue or handshake): what reuseport-standby exists to bring to 0. "
            "*Closed between keep-alive requests*: a request sent on a keep-alive connection that had already "
            "carried requests, which the server side closed or lost with the request unread (the client checks a "
            "connection before reusing it, as urllib3 does; what is left is the race with a close in flight, which "
            "HTTP clients retry). *Lost inside workers*: a worker had accepted the connection (bench/recording.py "
            "logs the client port and time of every accept) and died or dropped it before answering; in brackets, "
            "how many had reached the app. *Never reached the app*: what the app's own record of request ids "
            "alone would count as not delivered.\n",
            failures_table(results),
            "\n## Latency (answered requests), throughput, who answered\n", latency_table(results),
            "\n## Per restart\n", per_restart_table(results),
            "\n## Kernel counters (nstat deltas over each load)\n",
            "In the benchmark's own network namespace, so nothing else counts. *TCPAbortOnClose*: RSTs sent "
            "because a process closed (or died with) an accepted connection whose request it had not read. "
            "*Other RSTs* (OutRsts minus those): mostly connections reset in a closing listener's accept queue "
            "or handshake, and refused connections.\n",
            kernel_table(results)]
    ov = results.get("overhead")
    if ov and not ov.get("error"):
        al, si = ov["alternating"], ov["simultaneous"]

        def ratio(o: dict[str, Any], key: str = "ratio") -> str:
            if o.get(f"{key}_median") is None:
                return "—"
            return f"**{o[key + '_median']:.3f}** ({o[key + '_q1']:.2f}–{o[key + '_q3']:.2f})"

        out += ["\n## Steady state (no restarts)\n",
                f"{ov['app']} with no extra work; reuseport-standby (supervisor, primary, idle standby) against "
                f"{ov['plain']} without it; {al['rounds']} rounds of {ov['seconds_per_round']:g} s. *Alternating*: "
                f"the whole load against one, then the other (order flipped every round). *Simultaneous*: half the "
                f"load against each at once, so both see the same contention from the rest of the machine. Ratios "
                f"are ours / plain per round: median (interquartile range). CPU: time on CPU of every process of each side "
                f"(ours: supervisor, primary and standby with their workers), from schedstat.\n",
                _table(["", "alternating", "simultaneous"], [
                    ["reuseport-standby, req/s (mean)", f"{al['reuseport_standby_rps_mean']:.0f}",
                     f"{si['reuseport_standby_rps_mean']:.0f}"],
                    [f"{ov['plain']}, req/s (mean)", f"{al['plain_rps_mean']:.0f}", f"{si['plain_rps_mean']:.0f}"],
                    ["throughput ratio", ratio(al), ratio(si)],
                    ["server CPU per request, ours / plain",
                     f"{al['reuseport_standby_cpu_ms_per_request']:.3f} / {al['plain_cpu_ms_per_request']:.3f} ms",
                     f"{si['reuseport_standby_cpu_ms_per_request']:.3f} / {si['plain_cpu_ms_per_request']:.3f} ms"],
                    ["CPU ratio (plain / ours per request)", ratio(al, "cpu_ratio"), ratio(si, "cpu_ratio")],
                ]),
                f"\nTarget: ≥ {ov['target']}.\n"]
    elif ov:
        out.append(f"\n## Steady state\n\n**{ov['error']}**\n")
    bpf = results.get("bpf_cost")
    if bpf:
        out.append("\n## BPF program run time (bpf_enable_stats)\n")
        rows = []
        for key, entry, variant, r in _rows(results):
            p = r.get("bpf_prog") or {}
            if p.get("runs"):
                rows.append([key, variant, p["runs"], f"{p['ns_per_run']:.0f}"])
        if rows:
            out.append("Under the benchmark's load (every new connection and every migrated request):\n\n")
            out.append(_table(["contender", "load", "program runs", "ns per run"], rows))
        syn = bpf.get("synthetic") or {}
        if syn:
            out.append("\nSynthetic (bench/loader.py): " + ", ".join(
                f"{k[:-3]} {v:.0f} ns" for k, v in syn.items() if k.endswith("_ns")) + ".\n")
    return "\n".join(out)


def chart(results: dict[str, Any], path: Path) -> Path:
    """Failures per contender (both loads), and a throughput / latency timeline per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    m = results["meta"]
    keys = [k for k, e in results["contenders"].items() if e.get("variants")]
    timeline_variant = "new-connection"
    with_tl = [k for k in keys if timeline_variant in results["contenders"][k]["variants"]]
    n_rows = 1 + len(with_tl)
    fig = plt.figure(figsize=(12, 3.4 + 2.3 * len(with_tl)), dpi=100)
    gs = fig.add_gridspec(n_rows, 1, height_ratios=[1.5] + [1] * len(with_tl), hspace=0.55)

    ax = fig.add_subplot(gs[0])
    labels, conn_new, conn_reused, in_worker = [], [], [], []
    for k in keys:
        for variant, r in results["contenders"][k]["variants"].items():
            labels.append(f"{k}\n{'new conn.' if variant == 'new-connection' else variant}\n{r['restarts']} restarts")
            conn_new.append(r["lost_connection_level"])
            conn_reused.append(r["failed_on_reused_keepalive"])
            in_worker.append(r["lost_in_worker"])
    xs = list(range(len(labels)))
    ax.bar(xs, conn_new, color="#d62728", label="lost at connection level")
    ax.bar(xs, conn_reused, bottom=conn_new, color="#ff9896", label="closed between keep-alive requests")
    bottoms = [a + b for a, b in zip(conn_new, conn_reused)]
    ax.bar(xs, in_worker, bottom=bottoms, color="#7f7f7f", label="lost inside workers")
    for x, a, b, c in zip(xs, conn_new, conn_reused, in_worker):
        ax.text(x, a + b + c, f"{a} | {b} | {c}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("failed requests")
    top = max([a + b + c for a, b, c in zip(conn_new, conn_reused, in_worker)] + [1])
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Restarts under load — {m['server']}, {m['workers']} workers/instance, {m['concurrency']} clients, "
                 f"kernel {m['kernel']}, {m['cpus']} shared CPUs  (labels: connection-level | keep-alive close race | in workers)", fontsize=9)

    first = None
    for i, k in enumerate(with_tl):
        r = results["contenders"][k]["variants"][timeline_variant]
        tl = r["timeline"]
        b = tl["bucket_s"]
        t = [j * b for j in range(len(tl["ok"]))]
        axt = fig.add_subplot(gs[1 + i], sharex=first)
        first = first or axt
        axt.fill_between(t, [x / b for x in tl["ok"]], step="post", color=COLORS.get(k, "#2f6db5"), alpha=0.35,
                         label="answered req/s")
        fails = [(tt, x / b) for tt, x in zip(t, tl["failed"]) if x]
        if fails:
            axt.bar([f[0] for f in fails], [f[1] for f in fails], width=b, align="edge", color="#d62728",
                    label="failed req/s")
        axt.set_ylabel("req/s", fontsize=8)
        axl = axt.twinx()
        axl.plot(t, [x if x is not None else float("nan") for x in tl["max_ms"]], color="black", linewidth=0.8,
                 label="max latency")
        axl.plot(t, [x if x is not None else float("nan") for x in tl["p99_ms"]], color="#9467bd", linewidth=0.8,
                 label="p99 latency")
        axl.set_yscale("log")
        axl.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=5))
        axl.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axl.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axl.set_ylabel("latency, ms", fontsize=8)
        for s in r["steps"]:
            axt.axvline(s["at"], color="#444", linestyle="--" if s["kind"] == "term" else ":" if s["kind"] == "hup"
                        else "-", linewidth=0.7)
        axt.set_title(f"{k}: {r['lost_connection_level']} lost at connection level, {r['lost_in_worker']} inside "
                      f"workers, {r['throughput_rps']:.0f} req/s, max {r['latency_ms']['max']:.0f} ms "
                      f"(restarts: -- SIGTERM, — SIGKILL, ··· SIGHUP)", fontsize=8)
        if i == 0:
            h1, l1 = axt.get_legend_handles_labels()
            h2, l2 = axl.get_legend_handles_labels()
            axt.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", ncol=4)
        if i == len(with_tl) - 1:
            axt.set_xlabel(f"seconds into the {timeline_variant} load")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
