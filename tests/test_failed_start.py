"""A start that cannot work changes nothing: every address is tried before anything is loaded or pinned,
and whatever a start made before it failed is removed (issue 17, item 2).

Each case runs the real ``reuseport-standby supervise`` as root against the real kernel and bpffs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import TEST_PIN_BASE, free_port, remove_pins


def supervise(pin_root: Path, control: Path, *binds: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = ["--service", "svc", "--pin-root", str(pin_root), "--control", str(control), *extra]
    for b in binds:
        args += ["--bind", b]
    return subprocess.run([sys.executable, "-m", "reuseport_standby", "supervise", *args],
                          capture_output=True, text=True, timeout=60)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exit 1 and one line on stderr, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def where(kernel: None, tmp_path: Path):
    """A pin root that does not exist yet (below the test base) and a control socket path."""
    root = TEST_PIN_BASE / f"fs-{uuid.uuid4().hex[:10]}"
    TEST_PIN_BASE.mkdir(mode=0o700, exist_ok=True)
    yield root, tmp_path / "c.sock"
    remove_pins(root)


@pytest.mark.parametrize("bad,expect", [
    ("10.255.255.254", "not an address of this host"),
    ("[fe80::1%lo]", "not an address of this host"),
    ("[fe80::1%nosuch0]", "No network interface has that name"),
], ids=["foreign-v4", "link-local", "no-interface"])
def test_an_address_that_is_not_ours_is_refused_before_anything_is_pinned(where, bad: str, expect: str) -> None:
    """The first address is fine, the second cannot be bound: nothing is pinned, for either."""
    pin_root, control = where
    port = free_port()
    line = one_line(supervise(pin_root, control, f"127.0.0.1:{port}", f"{bad}:{port}"))
    assert expect in line, line
    assert not pin_root.exists(), list(pin_root.rglob("*"))
    assert not control.exists()


def test_a_port_held_without_so_reuseport_is_refused_before_anything_is_pinned(where) -> None:
    pin_root, control = where
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        line = one_line(supervise(pin_root, control, f"127.0.0.1:{free_port()}", f"127.0.0.1:{held.getsockname()[1]}"))
    finally:
        held.close()
    assert "without SO_REUSEPORT" in line and "troubleshooting.md#port-held-by-a-socket-without-so_reuseport" in line, line
    assert not pin_root.exists(), list(pin_root.rglob("*"))


def test_another_reuseport_group_on_the_address_is_not_taken_over(where) -> None:
    """A root SO_REUSEPORT listener of someone else (another service, a plain server) on the address of
    a fresh service: joining its group would attach our program to it. Refused, nothing pinned, and the
    other server still gets its connections."""
    pin_root, control = where
    port = free_port()
    theirs = socket.socket()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    theirs.bind(("127.0.0.1", port))
    theirs.listen()
    theirs.settimeout(5)
    try:
        line = one_line(supervise(pin_root, control, f"127.0.0.1:{port}"))
        assert "already listen there" in line and "take it over" in line, line
        assert not pin_root.exists(), list(pin_root.rglob("*"))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = theirs.accept()
            conn.close()
    finally:
        theirs.close()


def test_pins_made_before_a_later_failure_are_removed(where, tmp_path: Path) -> None:
    """The program is loaded and pinned for both addresses, then the control socket cannot be made (its
    directory is writable by others): the failed start removes the pins it made, its service directory
    and the pin root it created."""
    pin_root, _ = where
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)
    port = free_port()
    line = one_line(supervise(pin_root, unsafe / "c.sock", f"127.0.0.1:{port}", f"[::1]:{port}"))
    assert "refusing to listen at" in line, line
    assert not pin_root.exists(), list(pin_root.rglob("*"))


def test_a_failed_start_leaves_the_pins_of_a_running_service_alone(where, tmp_path: Path) -> None:
    """A second supervisor of a running service, and a restart that fails later, remove nothing of the
    pins they found."""
    import time

    pin_root, control = where
    port = free_port()
    first = subprocess.Popen([sys.executable, "-m", "reuseport_standby", "supervise", "--service", "svc",
                              "--pin-root", str(pin_root), "--control", str(control), "--bind", f"127.0.0.1:{port}"],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not control.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.exists(), first.poll()
        pinned = sorted(p.relative_to(pin_root) for p in pin_root.rglob("*"))
        assert pinned, "the first supervisor pinned nothing"
        line = one_line(supervise(pin_root, tmp_path / "other.sock", f"127.0.0.1:{port}"))
        assert "already has a supervisor" in line, line
        assert sorted(p.relative_to(pin_root) for p in pin_root.rglob("*")) == pinned
    finally:
        first.terminate()
        first.communicate(timeout=20)
    # The service stopped (its pins stay for the next supervisor); a restart that fails on its control
    # socket leaves them as they were.
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)
    line = one_line(supervise(pin_root, unsafe / "c.sock", f"127.0.0.1:{port}"))
    assert "refusing to listen at" in line, line
    assert sorted(p.relative_to(pin_root) for p in pin_root.rglob("*")) == pinned
