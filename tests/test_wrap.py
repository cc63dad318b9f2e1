"""How `run` rewrites a user's server command (no kernel needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from reuseport_standby.errors import ReuseportStandbyError
from reuseport_standby.wrap import instance_command


def test_uvicorn_command_becomes_ours_without_address_options() -> None:
    cmd = instance_command(["uvicorn", "app:create", "--factory", "--host", "0.0.0.0", "--port=8000", "--workers", "2"])
    assert cmd == [sys.executable, "-m", "reuseport_standby", "uvicorn", "app:create", "--factory", "--workers", "2"]


def test_gunicorn_gets_our_config_and_loses_binds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = instance_command(["gunicorn", "-w", "4", "-b", "0.0.0.0:80", "--bind=[::]:80", "-b127.0.0.1:1", "--reuse-port", "mysite.wsgi"])
    assert cmd[1:] == ["-c", "python:reuseport_standby.conf", "-w", "4", "mysite.wsgi"]


def test_gunicorn_user_config_is_composed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gunicorn.conf.py").write_text("workers = 3\n")
    cmd = instance_command(["gunicorn", "app:app"], workdir=str(tmp_path))
    conf = Path(cmd[2])
    assert cmd[1] == "-c" and conf.parent == tmp_path
    text = conf.read_text()
    assert str(tmp_path / "gunicorn.conf.py") in text and "_compose" in text
    cmd = instance_command(["python3", "-m", "gunicorn", "-c", "python:mysite.gconf", "app:app"], workdir=str(tmp_path))
    assert "import_module('mysite.gconf')" in Path(cmd[4]).read_text()


def test_unknown_server_is_refused() -> None:
    with pytest.raises(ReuseportStandbyError, match="must start with 'gunicorn' or 'uvicorn'"):
        instance_command(["hypercorn", "app:app"])
