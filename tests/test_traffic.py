"""Traffic control and observability: canary weights, promote, drain, hung-instance demotion, metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import free_port
from helpers.procs import REPO, wait_for
from reuseport_standby import client
from reuseport_standby.loadgen import Load
from helpers.echo import Echo, host_port, who


def admin(sup, **msg) -> dict:
    return client.admin(sup.service, msg, sup.control)


def cli(sup, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reuseport_standby", *args, "--service", sup.service,
                           "--control", sup.control], cwd=REPO, capture_output=True, text=True, timeout=30)


def pair(sup) -> tuple[Echo, Echo]:
    standby = Echo(sup, "standby").wait()
    primary = Echo(sup, "primary").wait()
    return primary, standby


def test_canary_weight_share_and_live_changes(supervisor) -> None:
    sup = supervisor()
    primary, standby = pair(sup)
    host, port = host_port(sup)
    r = cli(sup, "weight", "--standby", "10")
    assert r.returncode == 0 and "10%" in r.stdout, r.stderr
    res = Load(host, port, concurrency=8, duration=120, max_requests=10_000).start().wait()
    share = res.served_by["standby"] / res.ok
    print(f"\nweight 10: {res.ok} connections, standby share {share:.3%}")
    assert res.ok == 10_000 and res.failed == 0
    assert 0.08 <= share <= 0.12
    # Changed at run time, under load, with no failed request.
    with Load(host, port, concurrency=8, duration=60) as load:
        for w in (50, 100, 0, 30, 0):
            time.sleep(0.4)
            admin(sup, op="weight", standby=w)
        time.sleep(0.4)
        load.stop()
    assert load.result.failed == 0 and load.result.ok > 0
    # Failover still applies: weight 100 but no standby -> the primary takes everything.
    admin(sup, op="weight", standby=100)
    standby.stop()
    assert who(host, port, 20) == Counter({f"primary {primary.proc.pid}": 20})
    r = cli(sup, "weight", "--standby", "101")
    assert r.returncode != 0
    primary.stop()


def test_promote_under_load_flips_at_once(supervisor) -> None:
    sup = supervisor()
    primary, standby = pair(sup)
    host, port = host_port(sup)
    with Load(host, port, concurrency=8, duration=60, record_events=True) as load:
        time.sleep(0.5)
        t0 = time.monotonic() - load._start
        r = cli(sup, "promote")
        t1 = time.monotonic() - load._start
        time.sleep(0.5)
        load.stop()
    assert r.returncode == 0, r.stderr
    res = load.result
    assert res.failed == 0, res.failures
    before = [who for t, kind, who in res.events if t < t0]
    after = [who for t, kind, who in res.events if t > t1 + 0.1]
    print(f"\npromote took {(t1 - t0) * 1000:.0f} ms (a CLI process); {len(after)} requests after it")
    assert set(before) == {"primary"} and set(after) == {"standby"} and len(after) > 50
    st = sup.status()
    assert st["roles_swapped"] is True
    roles = {i["pid"]: i["role"] for i in st["instances"]}
    assert roles == {primary.proc.pid: "standby", standby.proc.pid: "primary"}
    # The new standby still backs up the new primary.
    standby.stop()
    assert who(host, port, 10) == Counter({f"primary {primary.proc.pid}": 10})
    primary.stop()


def test_drain_and_undrain(supervisor) -> None:
    sup = supervisor()
    primary, standby = pair(sup)
    host, port = host_port(sup)
    r = cli(sup, "drain", "--role", "primary")
    assert r.returncode == 0 and "drained" in r.stdout, r.stderr
    assert who(host, port, 20) == Counter({f"standby {standby.proc.pid}": 20})
    assert primary.state() == "drained" and primary.proc.poll() is None
    (addr,) = sup.status()["addresses"]
    assert [s["disabled"] for s in addr["slots"] if s["role"] == "primary"] == [True]
    r = cli(sup, "undrain", "--role", "primary")
    assert r.returncode == 0, r.stderr
    assert who(host, port, 20) == Counter({f"primary {primary.proc.pid}": 20})
    r = cli(sup, "undrain", "--role", "primary")
    assert r.returncode == 1 and "no drained primary" in r.stderr
    primary.stop()
    standby.stop()


def _stop_tree(pid: int, sig: int) -> None:
    os.kill(pid, sig)


@pytest.mark.parametrize("policy", ["demote", "kill"])
def test_hung_primary_is_demoted_and_its_queue_handed_over(supervisor, policy: str) -> None:
    stall = 1.0
    sup = supervisor(extra=["--stall-timeout", str(stall), "--on-hang", policy])
    primary, standby = pair(sup)
    host, port = host_port(sup)
    with Load(host, port, concurrency=8, duration=60, record_events=True, timeout=10) as load:
        time.sleep(0.5)
        t_stop = time.monotonic() - load._start
        os.kill(primary.proc.pid, signal.SIGSTOP)
        wait_for(lambda: primary.state() in ("demoted", None), stall + 3, what="demotion")
        time.sleep(stall + 1)
        t_check = time.monotonic() - load._start
        time.sleep(0.5)
        if policy == "demote":
            os.kill(primary.proc.pid, signal.SIGCONT)
            wait_for(lambda: primary.state() == "active", 15, what="recovery")
            time.sleep(0.5)
        load.stop()
    res = load.result
    print(f"\n{policy}: {res.summary()}")
    # The echo instance handles one connection at a time: the one it was inside
    # when frozen cannot be saved (it waits for SIGCONT, or dies with the kill).
    # Every request sent after the freeze must succeed within the stall timeout.
    sent = [(t - lat, t, k) for (t, k, _), lat in zip(res.events, res.latencies)]
    in_flight = [x for x in sent if x[0] < t_stop and (x[2] != "ok" or x[1] - x[0] > stall + 1.5)]
    after = [x for x in sent if x[0] >= t_stop]
    assert len(in_flight) <= 1, in_flight
    assert all(k == "ok" for _, _, k in after), Counter(k for _, _, k in after)
    assert max(t1 - t0 for t0, t1, _ in after) <= stall + 1.5, "queued requests waited at most about the stall timeout"
    late = [w for t, k, w in res.events if t_stop + stall + 1 < t < t_check]
    assert late and set(late) == {"standby"}
    if policy == "demote":
        assert res.events[-1][2] == "primary", "a recovered primary serves again"
        st = sup.status()
        (p,) = [i for i in st["instances"] if i["pid"] == primary.proc.pid]
        assert p["demotions"] == 1 and "none accepted" in p["demoted_for"]
    else:
        primary.proc.wait(5)
        assert primary.proc.returncode == -signal.SIGKILL
    primary.stop()
    standby.stop()


def test_metrics_endpoint_matches_traffic(supervisor) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    mport = free_port()
    sup = supervisor(extra=["--metrics", f"127.0.0.1:{mport}"])
    primary, standby = pair(sup)
    host, port = host_port(sup)
    who(host, port, 37)
    standby.stop()
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    addr = sup.binds[0]
    key = lambda kind, role: ("reuseport_standby_connections_total",
                              tuple(sorted({"service": sup.service, "address": addr, "kind": kind, "role": role}.items())))
    assert samples[key("selected", "primary")] == 37
    assert samples[key("selected", "standby")] == 0
    inst = ("reuseport_standby_instances", tuple(sorted({"service": sup.service, "role": "primary", "state": "active"}.items())))
    assert samples[inst] == 1
    assert ("reuseport_standby_kernel_tcp_total", (("counter", "TCPMigrateReqSuccess"),)) in samples
    primary.stop()


def test_group_members_read_pins_without_privilege(supervisor) -> None:
    """With --group, the pins are group-readable: an unprivileged member reads status offline."""
    sup = supervisor(extra=["--group", "nogroup"])
    primary = Echo(sup, "primary").wait()
    host, port = host_port(sup)
    who(host, port, 4)
    sup.kill(signal.SIGKILL)
    # Everything is imported before dropping to nobody (this interpreter lives under /root).
    code = (
        "import os, sys, json; from reuseport_standby import status, client, supervisor, runner; from reuseport_standby.kernel import diag, group\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "st = status.collect(sys.argv[1], sys.argv[2], sys.argv[3]); print(json.dumps(st))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, sup.service, sup.control, str(sup.pin_root)], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    import json

    st = json.loads(r.stdout)
    assert st["source"] == "pins" and st["addresses"][0]["counters"]["selected_primary"] == 4
    # ...but cannot write: a read-only fd refuses map updates.
    code_w = (
        "import os, sys; from reuseport_standby.kernel.group import Group; from reuseport_standby.kernel.layout import Config\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "g = Group.adopt(sys.argv[1])\n"
        "try:\n  g.write_config(Config()); print('WROTE')\nexcept OSError as e: print('refused', e.errno)\n"
    )
    pin = next((sup.pin_root / sup.service).iterdir())
    r = subprocess.run([sys.executable, "-c", code_w, str(pin)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("refused"), r.stdout + r.stderr
    # Where systemd mounted bpffs (mode 0700, found in the Debian 12 VM): a clear answer, no traceback.
    bpffs = Path("/sys/fs/bpf")
    mode = bpffs.stat().st_mode & 0o7777
    cli = ("import os, sys; from reuseport_standby import cli, status\n"
           "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
           "sys.exit(cli.main(['status', '--service', sys.argv[1], '--control', sys.argv[2], '--pin-root', sys.argv[3]]))\n")
    run_cli = lambda: subprocess.run([sys.executable, "-c", cli, sup.service, sup.control, str(sup.pin_root)],  # noqa: E731
                                     cwd=REPO, capture_output=True, text=True, timeout=30)
    try:
        bpffs.chmod(0o700)
        refused = run_cli()
        bpffs.chmod(0o701)  # the remedy docs/deployment.md gives: traversal only
        allowed = run_cli()
    finally:
        bpffs.chmod(mode)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr and "mode 0700" in refused.stderr, refused.stderr
    assert allowed.returncode == 3 and "state read from pins" in allowed.stdout, allowed.stdout + allowed.stderr
    primary.stop()
