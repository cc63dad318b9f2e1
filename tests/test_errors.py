"""Clear errors for environments that cannot work (no kernel needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reuseport_standby.errors import BpfUnavailable
from reuseport_standby.kernel.pins import check_bpffs
from reuseport_standby.kernel.sockets import Address


def test_bpffs_missing_says_how_to_mount(tmp_path: Path) -> None:
    with pytest.raises(BpfUnavailable, match="mount -t bpf bpf /sys/fs/bpf"):
        check_bpffs(str(tmp_path / "pins"))


@pytest.mark.parametrize("text,expect", [
    ("127.0.0.1:8000", Address("127.0.0.1", 8000)),
    ("[::1]:8443", Address("::1", 8443)),
    (":80", Address("0.0.0.0", 80)),
    ("localhost:81", Address("127.0.0.1", 81)),
])
def test_address_parse(text: str, expect: Address) -> None:
    assert Address.parse(text) == expect


@pytest.mark.parametrize("text,msg", [
    ("127.0.0.1:0", "Port 0"),
    ("127.0.0.1", "expected HOST:PORT"),
    ("example.com:80", "numeric"),
    ("::1:80", "expected HOST:PORT"),
    ("127.0.0.1:70000", "1-65535"),
])
def test_address_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Address.parse(text)


def test_group_names_have_no_dots() -> None:
    assert Address("127.0.0.1", 80).group_name == "127_0_0_1:80"
    assert Address("::1", 80).group_name == "[::1]:80"


def test_libbpf_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """No libbpf on the machine (the loader's only way in): a clear install hint, not a ctypes trace."""
    import ctypes

    from reuseport_standby.kernel import libbpf

    def no_such_library(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    libbpf.load.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", no_such_library)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    try:
        with pytest.raises(BpfUnavailable, match="apt-get install libbpf1") as err:
            libbpf.load()
        assert str(err.value).endswith("(see docs/troubleshooting.md#libbpf-missing-or-too-old)")
    finally:
        monkeypatch.undo()
        libbpf.load.cache_clear()


def test_bcc_missing_and_headers_missing_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from reuseport_standby.kernel import bcc_loader

    monkeypatch.setitem(sys.modules, "bcc", None)  # as if not installed anywhere
    monkeypatch.setattr(bcc_loader, "SYSTEM_DIST_PACKAGES", (str(tmp_path),))
    with pytest.raises(BpfUnavailable, match="apt-get install python3-bpfcc"):
        bcc_loader.import_bcc()
    monkeypatch.setattr(bcc_loader.platform, "release", lambda: "0.0.0-no-such-kernel")
    assert "linux-headers" in (bcc_loader.headers_problem() or "")


def test_default_loader_never_imports_bcc(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, reuseport_standby.supervisor, reuseport_standby.cli, reuseport_standby.kernel.group\n"
            "print('bcc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _supervise(args: list[str], *, block: str | None = None) -> "subprocess.CompletedProcess[str]":
    """``reuseport-standby supervise ARGS`` in a fresh interpreter (``block``: a module it cannot import)."""
    pre = f"sys.modules[{block!r}] = None; " if block else ""
    code = "import sys; " + pre + "from reuseport_standby.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "supervise", *args], capture_output=True, text=True, timeout=60)


def test_metrics_without_prometheus_client_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    """No traceback, and nothing loaded or pinned: the check comes before the supervisor starts (a pin root
    that does not exist stays so; a start would have made it or failed on bpffs first)."""
    pins = tmp_path / "pins"
    r = _supervise(["--service", "m", "--bind", "127.0.0.1:1", "--metrics", "127.0.0.1:1",
                    "--control", str(tmp_path / "c.sock"), "--pin-root", str(pins)], block="prometheus_client")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "pip install 'reuseport-standby[metrics]'" in r.stderr, r.stderr
    assert not pins.exists() and not (tmp_path / "c.sock").exists()


@pytest.mark.kernel
def test_metrics_on_a_busy_port_is_one_line_and_the_supervisor_cleans_up(tmp_path: Path) -> None:
    """The port of --metrics is taken: one line, exit 1, and the supervisor's close() still runs (its
    control socket gone, the service lock released: the same service starts again at once)."""
    import os
    import socket
    import uuid

    from conftest import TEST_PIN_BASE, free_port, remove_pins

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    service = f"m{uuid.uuid4().hex[:10]}"
    pin_root = TEST_PIN_BASE / service
    control = f"/tmp/rs-{service}.sock"
    args = ["--service", service, "--bind", f"127.0.0.1:{free_port()}", "--control", control,
            "--pin-root", str(pin_root)]
    try:
        r = _supervise([*args, "--metrics", f"127.0.0.1:{busy.getsockname()[1]}"])
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "--metrics" in last and "cannot listen there" in last, r.stderr
        assert not os.path.exists(control), "close() did not run"
        import time

        again = subprocess.Popen([sys.executable, "-m", "reuseport_standby", "supervise", *args],
                                 stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(control) and again.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.exists(control), f"the service did not start again: {again.poll()}"
        finally:
            again.terminate()
            _, err = again.communicate(timeout=15)
        assert "already has a supervisor" not in err, err
    finally:
        busy.close()
        remove_pins(pin_root)
