"""Clear errors for environments that cannot work (no kernel needed)."""

from __future__ import annotations

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
        with pytest.raises(BpfUnavailable, match="apt-get install libbpf1"):
            libbpf.load()
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
