"""The selection program in the running kernel, with real sockets and clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, require_bcc
from helpers.netutil import accept_pending, collect, open_clients, serve
from reuseport_standby.kernel.layout import PARKING_SLOT, Config, Counter, Role
from reuseport_standby.kernel.group import Group
from reuseport_standby.kernel.sockets import socket_cookie
from reuseport_standby.kernel.sockets import Address, create_listener, requeue

P0 = Role.PRIMARY.slot_range[0]
S0 = Role.STANDBY.slot_range[0]
N = 64


@pytest.fixture(params=["ipv4", "ipv6"])
def address(request: pytest.FixtureRequest, kernel: None) -> Address:
    if request.param == "ipv6":
        return Address("::1", free_port(socket.AF_INET6))
    return Address("127.0.0.1", free_port())


@pytest.fixture(params=["libbpf", "bcc"])
def loader(request: pytest.FixtureRequest, kernel: None) -> str:
    """Every kernel test runs with both loaders of the same C program."""
    if request.param == "bcc":
        require_bcc()
    return request.param


def open_group(pin_root: Path, address: Address, migrate: bool = True, loader: str = "libbpf") -> Group:
    return Group.open(pin_root / address.group_name, migrate=migrate, loader=loader)


def activate(group: Group, slot: int, sock: socket.socket) -> None:
    """Slot a socket, then add it to the live-slot table, as the supervisor does."""
    group.set_slot(slot, sock)
    group.write_config(group.read_config().with_live(group.slots()))


def target(address: Address) -> tuple[str, int]:
    return (address.host, address.port)


def test_primary_takes_every_new_connection(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        primary, standby = create_listener(address), create_listener(address)
        g.attach(primary)
        activate(g, P0, primary)
        activate(g, S0, standby)
        clients = open_clients(target(address), N, address.family)
        assert serve(primary, limit=N) == N
        assert accept_pending(standby) == 0
        assert collect(clients).answered == N
        c = g.counters()
        assert c[Counter.SELECTED_PRIMARY] == N and c[Counter.SELECTED_STANDBY] == 0


def test_failover_to_standby_and_back(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        primary, standby = create_listener(address), create_listener(address)
        g.attach(standby)
        activate(g, P0, primary)
        activate(g, S0, standby)
        primary.close()
        assert g.slot_cookie(P0) is None, "the kernel empties the slot of a closed socket"
        clients = open_clients(target(address), 20, address.family)
        assert serve(standby, limit=20) == 20
        assert collect(clients).answered == 20

        primary = create_listener(address)
        activate(g, P0, primary)
        clients = open_clients(target(address), 20, address.family)
        assert serve(primary, limit=20) == 20
        assert accept_pending(standby) == 0
        assert collect(clients).answered == 20
        c = g.counters()
        assert (c[Counter.SELECTED_PRIMARY], c[Counter.SELECTED_STANDBY]) == (20, 20)
        primary.close()
        standby.close()


def _kill_owner(primary: socket.socket) -> None:
    """Give the only fd of ``primary`` to a child process and SIGKILL the child."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[primary.fileno()])
    primary.close()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)


ENDINGS = {
    "close": lambda s: s.close(),
    "shutdown": lambda s: s.shutdown(socket.SHUT_RDWR),
    "sigkill": _kill_owner,
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
@pytest.mark.parametrize("migrate", [True, False], ids=["select_or_migrate", "plain_select"])
def test_queue_of_dying_primary(pin_root: Path, address: Address, ending: str, migrate: bool, loader: str) -> None:
    """N connections wait, unaccepted, in the primary's queue when it dies.

    With SELECT_OR_MIGRATE the standby answers every one; the same program
    loaded as plain SELECT (the published demo design) resets every one.
    """
    with open_group(pin_root, address, migrate=migrate, loader=loader) as g:
        assert g.migrate is migrate
        primary, standby = create_listener(address), create_listener(address)
        g.attach(standby)
        activate(g, P0, primary)
        activate(g, S0, standby)
        clients = open_clients(target(address), N, address.family)
        ENDINGS[ending](primary)
        answered = serve(standby, limit=N, timeout=3 if migrate else 1)
        outcome = collect(clients)
        if migrate:
            assert (answered, outcome.answered, outcome.failures) == (N, N, {})
            assert g.counters()[Counter.MIGRATED_STANDBY] == N
        else:
            assert answered == 0
            assert outcome.answered == 0 and outcome.failures.get("reset", 0) + outcome.failures.get("eof", 0) == N
        standby.close()
        if ending == "shutdown":
            primary.close()


def test_dying_primary_prefers_its_role_mate(pin_root: Path, address: Address, loader: str) -> None:
    """During a primary restart overlap, the old primary's queue goes to the new primary, not the standby."""
    with open_group(pin_root, address, loader=loader) as g:
        old, new, standby = (create_listener(address) for _ in range(3))
        g.attach(standby)
        activate(g, P0, old)
        activate(g, S0, standby)
        clients = open_clients(target(address), N, address.family)
        activate(g, P0 + 1, new)
        old.close()
        assert serve(new, limit=N) == N
        assert accept_pending(standby) == 0
        assert collect(clients).answered == N
        assert g.counters()[Counter.MIGRATED_PRIMARY] == N
        new.close()
        standby.close()


def test_even_shares_after_a_hole(pin_root: Path, address: Address, loader: str) -> None:
    """The dense live-slot table: slots 0 and 2 live, 1 empty, each gets half within 10% of its share
    (the former probe loop gave slot 2 two thirds).

    2,000 connections: by 4-tuple hash a share's standard deviation is 22, the bound 100 (4.5 of them)."""
    n, batch = 2000, 200
    with open_group(pin_root, address, loader=loader) as g:
        socks = [create_listener(address, 1024) for _ in range(3)]
        g.attach(socks[0])
        for i, s in enumerate(socks):
            activate(g, P0 + i, s)
        socks[1].close()  # the kernel empties slot 1 ...
        g.write_config(g.read_config().with_live(g.slots()))  # ... and user space drops it from the table
        assert g.read_config().live[0] == (P0, P0 + 2)
        got = [0, 0]
        for _ in range(n // batch):
            clients = open_clients(target(address), batch, address.family)
            got[0] += accept_pending(socks[0])
            got[1] += accept_pending(socks[2])
            collect(clients)
        assert sum(got) == n
        assert all(abs(share - n / 2) <= n / 2 * 0.1 for share in got), got
        assert g.slot_hits([P0, P0 + 2]) == {P0: got[0], P0 + 2: got[1]}
        for s in (socks[0], socks[2]):
            s.close()


def test_stale_table_entry_falls_to_the_next_live_slot(pin_root: Path, address: Address, loader: str) -> None:
    """A SIGKILLed listener empties its slot before user space hears: no connection is refused, parked or reset."""
    n = 120
    with open_group(pin_root, address, loader=loader) as g:
        socks = [create_listener(address, 1024) for _ in range(3)]
        standby = create_listener(address, 1024)
        g.attach(socks[0])
        for i, s in enumerate(socks):
            activate(g, P0 + i, s)
        activate(g, S0, standby)
        socks[1].close()  # the table still lists slot 1
        assert P0 + 1 in g.read_config().live[0]
        clients = open_clients(target(address), n, address.family)
        got = [accept_pending(socks[0]), accept_pending(socks[2]), accept_pending(standby)]
        collect(clients)
        assert got[0] + got[1] == n and got[2] == 0, got
        for s in (socks[0], socks[2], standby):
            s.close()


def test_parking_holds_connections_until_an_instance_appears(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        anchor = create_listener(address)
        g.attach(anchor)
        g.set_slot(PARKING_SLOT, anchor)
        clients = open_clients(target(address), 30, address.family)
        assert g.counters()[Counter.PARKED] == 30

        primary = create_listener(address)
        activate(g, P0, primary)
        requeue(anchor)
        g.set_slot(PARKING_SLOT, anchor)
        assert serve(primary, limit=30) == 30
        assert accept_pending(anchor) == 0
        assert collect(clients).answered == 30
        c = g.counters()
        assert (c[Counter.MIGRATED_PRIMARY], c[Counter.FELL_BACK]) == (30, 0)
        # Parking stays in service: with the primary gone, new connections park again.
        primary.close()
        clients = open_clients(target(address), 5, address.family)
        assert g.counters()[Counter.PARKED] == 35
        assert accept_pending(anchor) == 5
        anchor.close()
        for c in clients:
            c.close()


def test_standby_started_before_primary(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        standby = create_listener(address)
        g.attach(standby)
        activate(g, S0, standby)
        clients = open_clients(target(address), 10, address.family)
        assert serve(standby, limit=10) == 10
        collect(clients)
        primary = create_listener(address)
        activate(g, P0, primary)
        clients = open_clients(target(address), 10, address.family)
        assert serve(primary, limit=10) == 10
        assert accept_pending(standby) == 0
        assert collect(clients).answered == 10
        primary.close()
        standby.close()


def test_group_recreated_after_every_socket_closed(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        first = create_listener(address)
        g.attach(first)
        activate(g, P0, first)
        first.close()  # the group, and the program attached to it, are gone
        assert g.slots() == {}
        primary, standby = create_listener(address), create_listener(address)
        g.attach(primary)
        activate(g, P0, primary)
        activate(g, S0, standby)
        clients = open_clients(target(address), N, address.family)
        primary.close()
        assert serve(standby, limit=N) == N
        assert collect(clients).answered == N
        standby.close()


def test_slot_refuses_overwrite_and_cookie_guards_clear(pin_root: Path, address: Address, loader: str) -> None:
    with open_group(pin_root, address, loader=loader) as g:
        a, b = create_listener(address), create_listener(address)
        g.attach(a)
        g.set_slot(P0, a)
        with pytest.raises(OSError):
            g.set_slot(P0, b)  # a live slot is never overwritten
        with pytest.raises(OSError):
            g.set_slot(P0 + 1, a)  # a socket lives in one slot only
        assert g.slot_cookie(P0) == socket_cookie(a)
        assert not g.clear_slot(P0, expect_cookie=socket_cookie(b))
        assert g.slot_cookie(P0) == socket_cookie(a)
        assert g.clear_slot(P0, expect_cookie=socket_cookie(a))
        assert g.slot_cookie(P0) is None
        a.close()
        b.close()


def test_pinned_state_outlives_loader_and_is_readopted(pin_root: Path, address: Address, loader: str) -> None:
    pin = pin_root / address.group_name
    code = (
        "import sys; from reuseport_standby.kernel.group import Group; from reuseport_standby.kernel.layout import Config\n"
        "g = Group.open(sys.argv[1], loader=sys.argv[2]); g.write_config(Config(live=((0, 1, 2), ()), standby_weight=7))\n"
        "print(g.prog_info.id, g.map_ids['rs_slots'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(pin), loader], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent).stdout.split()
    prog_id, slots_id = int(out[0]), int(out[1])
    pins = ["prog_migrate", "rs_config", "rs_counters", "rs_slot_hits", "rs_slots"]
    with Group.open(pin, loader=loader) as g:
        assert g.prog_info.id == prog_id, "the pinned program is re-adopted, not duplicated"
        assert g.map_ids["rs_slots"] == slots_id
        assert g.read_config() == Config(live=((0, 1, 2), ()), standby_weight=7)
        assert sorted(os.listdir(pin)) == pins
        assert not g.replaced_program
    # The other loader re-adopts the same maps (its program differs: it replaces the pin).
    other = "bcc" if loader == "libbpf" else "libbpf"
    if other == "bcc":
        require_bcc()
    with Group.open(pin, loader=other) as g:
        assert g.map_ids["rs_slots"] == slots_id
        assert g.read_config() == Config(live=((0, 1, 2), ()), standby_weight=7)
        assert sorted(os.listdir(pin)) == pins
    # Switching to plain SELECT replaces the pinned program rather than mixing.
    with Group.open(pin, migrate=False, loader=loader) as g:
        assert g.replaced_program
        assert sorted(os.listdir(pin)) == ["prog_select", *pins[1:]]


def test_non_tcp_traffic_passes_untouched(pin_root: Path, kernel: None, loader: str) -> None:
    address = Address("127.0.0.1", free_port())
    with open_group(pin_root, address, loader=loader) as g:
        socks = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(target(address))
            socks.append(s)
        g.attach(socks[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(20):
                tx.sendto(b"x", target(address))
        got = 0
        for s in socks:
            s.setblocking(False)
            try:
                while s.recv(10):
                    got += 1
            except BlockingIOError:
                pass
            s.close()
        assert got == 20
        assert sum(g.counters().values.values()) == 0


def test_counters_match_the_traffic(pin_root: Path, kernel: None, loader: str) -> None:
    address = Address("127.0.0.1", free_port())
    with open_group(pin_root, address, loader=loader) as g:
        anchor, primary, standby = (create_listener(address) for _ in range(3))
        g.attach(anchor)
        g.set_slot(PARKING_SLOT, anchor)
        parked = open_clients(target(address), 3, address.family)
        activate(g, S0, standby)
        to_standby = open_clients(target(address), 5, address.family)
        activate(g, P0, primary)
        to_primary = open_clients(target(address), 7, address.family)
        primary.close()   # 7 queued: migrate to the standby
        standby.close()   # 5 + 7 queued: migrate to parking
        c = g.counters().as_dict()
        assert c == {
            "selected_primary": 7, "selected_standby": 5, "parked": 3,
            "migrated_primary": 0, "migrated_standby": 7, "migrated_parked": 12,
            "fell_back": 0, "migrate_fell_back": 0,
        }
        assert accept_pending(anchor) == 15
        anchor.close()
        for c in parked + to_standby + to_primary:
            c.close()


def test_without_cap_bpf_the_error_says_what_is_missing(pin_root: Path, kernel: None) -> None:
    pin = pin_root / "nocap"
    pin.mkdir(parents=True)
    os.chmod(pin_root, 0o777)
    os.chmod(pin, 0o777)
    code = (
        "import os, sys; from reuseport_standby.kernel.group import Group; from reuseport_standby.kernel.libbpf_loader import packaged_object\n"
        "from reuseport_standby import errors; from reuseport_standby.kernel import libbpf\n"
        "libbpf.load(); obj = packaged_object()  # resolved before dropping privileges\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n  Group.open(sys.argv[1], obj_path=obj); print('LOADED')\n"
        "except errors.ReuseportStandbyError as e: print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(pin)], capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).parent.parent)
    out = r.stdout
    assert out.startswith("PermissionProblem") and "CAP_BPF" in out, out + r.stderr[-2000:]


def test_bcc_loads_a_users_variant_and_shows_compiler_errors(pin_root: Path, tmp_path: Path, kernel: None) -> None:
    """--bpf-source: a variant (here: the standby first, always) runs; a broken one says why."""
    require_bcc()
    from reuseport_standby.kernel.bcc_loader import packaged_source
    from reuseport_standby.errors import BpfUnavailable

    variant = tmp_path / "standby_first.bpf.c"
    variant.write_text(packaged_source().read_text().replace(
        "\tfirst = RS_ROLE_PRIMARY;\n\tsecond = RS_ROLE_STANDBY;",
        "\tfirst = RS_ROLE_STANDBY;\n\tsecond = RS_ROLE_PRIMARY;"))
    address = Address("127.0.0.1", free_port())
    with Group.open(pin_root / address.group_name, loader="bcc", bpf_source=variant) as g:
        primary, standby = create_listener(address), create_listener(address)
        g.attach(primary)
        activate(g, P0, primary)
        activate(g, S0, standby)
        clients = open_clients(target(address), 10, address.family)
        assert serve(standby, limit=10) == 10 and accept_pending(primary) == 0
        collect(clients)
        primary.close()
        standby.close()
    broken = tmp_path / "broken.bpf.c"
    broken.write_text(packaged_source().read_text().replace("idx = hash % n;", "idx = hash % n"))
    with pytest.raises(BpfUnavailable, match=r"(?s)BCC could not compile.*error: expected ';'"):
        Group.open(pin_root / "broken", loader="bcc", bpf_source=broken)
    with pytest.raises(ValueError, match="--loader bcc"):
        Group.open(pin_root / "x", bpf_source=broken)


def _least_privilege(*cmd: str) -> list[str]:
    """Root with CAP_BPF alone (no CAP_PERFMON): the verifier then applies its Spectre v1 checks."""
    return ["setpriv", "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf", "--bounding-set=-all,+bpf", *cmd]


def test_program_loads_with_cap_bpf_alone(pin_root: Path, loader: str) -> None:
    """The least privilege docs/security.md states: CAP_BPF, no CAP_PERFMON, on 6.1 as on newer kernels."""
    pin = pin_root / f"least-{loader}"
    code = ("import sys; from reuseport_standby.kernel.group import Group\n"
            "with Group.open(sys.argv[1], loader=sys.argv[2]) as g: print(g.prog_info.xlated_prog_len // 8)\n")
    r = subprocess.run(_least_privilege(sys.executable, "-c", code, str(pin), loader),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 0


@pytest.mark.parametrize("log_size", [1 << 20, 2048], ids=["log-fits", "log-overflows"])
def test_verifier_rejection_shows_the_verifiers_conclusion(pin_root: Path, tmp_path: Path, log_size: int,
                                                           monkeypatch: pytest.MonkeyPatch, kernel: None) -> None:
    """Never a bare ENOSPC: when the log overflows its buffer the loader still shows why the verifier said no."""
    import shutil

    from reuseport_standby.kernel import libbpf_loader as loader_mod
    from reuseport_standby.kernel.bcc_loader import packaged_source
    from reuseport_standby.errors import BpfUnavailable

    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is needed to build the rejected variant (scripts/setup-host.sh installs it)")
    src = packaged_source()
    variant = tmp_path / "rejected.bpf.c"
    # Drop the NULL checks of the per-slot counter lookups (a variable key): the verifier must refuse.
    variant.write_text(src.read_text().replace("if (hits)\n\t\t*hits", "*hits"))
    assert variant.read_text() != src.read_text()
    shutil.copy(src.parent / "standby.h", tmp_path / "standby.h")
    obj = tmp_path / "rejected.bpf.o"
    arch = os.uname().machine
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-I", str(tmp_path), f"-I/usr/include/{arch}-linux-gnu",
                    "-c", str(variant), "-o", str(obj)], check=True, capture_output=True, timeout=120)
    monkeypatch.setattr(loader_mod, "_LOG_SIZE", log_size)
    with pytest.raises(BpfUnavailable) as info:
        Group.open(pin_root / "rejected", obj_path=obj)
    message = str(info.value)
    assert "invalid mem access 'map_value_or_null'" in message, message
    assert "verifier" in message
