"""Shared fixtures: kernel availability, per-test pin roots, free ports."""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import pytest

from reuseport_standby.kernel.pins import remove_tree as remove_pins  # tests import it from here
from helpers.netutil import free_port  # noqa: F401  (tests import it from here)

if TYPE_CHECKING:
    from helpers.uvicorn_runs import Instances

REQUIRE_KERNEL = os.environ.get("REUSEPORT_STANDBY_REQUIRE_KERNEL") == "1"
TEST_PIN_BASE = Path("/sys/fs/bpf/reuseport_standby_test")


@functools.lru_cache(maxsize=1)
def kernel_problem() -> str | None:
    """Why the BPF program cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "kernel tests need root (CAP_BPF, bpffs write access)"
    try:
        from reuseport_standby.kernel.group import Group

        pin = TEST_PIN_BASE / f"probe-{uuid.uuid4().hex[:8]}"
        with Group.open(pin, mount_bpffs=True):
            pass
        remove_pins(pin)
    except Exception as exc:  # any failure means: no kernel tests here
        return f"{type(exc).__name__}: {exc}"
    return None


def require_kernel() -> None:
    problem = kernel_problem()
    if problem is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"REUSEPORT_STANDBY_REQUIRE_KERNEL=1 but the BPF program cannot run: {problem}", pytrace=False)
    pytest.skip(f"BPF unavailable: {problem}")


@functools.lru_cache(maxsize=1)
def bcc_problem() -> str | None:
    try:
        from reuseport_standby.kernel import bcc_loader

        bcc_loader.import_bcc()
        return bcc_loader.headers_problem()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def require_bcc() -> None:
    """The BCC loader's tests skip only where BCC truly cannot run, and never in CI."""
    require_kernel()
    problem = bcc_problem()
    if problem is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"REUSEPORT_STANDBY_REQUIRE_KERNEL=1 but the BCC loader cannot run: {problem}", pytrace=False)
    pytest.skip(f"BCC unavailable: {problem}")


@pytest.fixture
def kernel() -> None:
    require_kernel()


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than in pyproject.toml: the VM checks run these tests without the project's config.
    config.addinivalue_line("markers", "kernel: needs root, bpffs or a kernel that loads the program "
                                       "(set automatically from the fixtures)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs root or the BPF program as ``kernel``, so that
    ``pytest -m "not kernel"`` (make test-fast) selects exactly the ones that need neither.

    A test needs them when its fixtures reach ``kernel`` (``pin_root``, ``supervisor`` and every
    fixture that starts a supervisor do); a test that needs root without them says so itself
    with ``@pytest.mark.kernel``.
    """
    for item in items:
        if "kernel" in getattr(item, "fixturenames", ()) and item.get_closest_marker("kernel") is None:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture
def pin_root(kernel: None) -> "Path":
    """A service-level pin root of this test's own, removed afterwards."""
    root = TEST_PIN_BASE / uuid.uuid4().hex[:12]
    yield root
    remove_pins(root)


@pytest.fixture
def port() -> int:
    return free_port()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Each test removes its own pins; another test session may still be using the base.
    try:
        TEST_PIN_BASE.rmdir()
    except OSError:
        pass


@pytest.fixture
def short_tmp() -> "Path":
    """A short, world-traversable temp dir: unix socket paths must stay under 108 bytes,
    and unprivileged instances must be able to reach the control socket."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def supervisor(pin_root: Path, short_tmp: Path):
    """Factory: start a real supervisor for a fresh service on free loopback port(s)."""
    from helpers.procs import SupervisorProc

    started: list[SupervisorProc] = []

    def start(*, binds: list[str] | None = None, extra: list[str] | None = None) -> SupervisorProc:
        service = f"t{uuid.uuid4().hex[:10]}"
        sup = SupervisorProc(service=service, binds=binds or [f"127.0.0.1:{free_port()}"],
                             control=str(short_tmp / f"{service}.sock"), pin_root=pin_root, extra=extra or [])
        started.append(sup.start())
        return sup

    yield start
    for sup in started:
        sup.stop()


@pytest.fixture
def instances() -> Iterator["Instances"]:
    """uvicorn instances started by a test: whatever still runs at its end is killed with its workers."""
    from helpers.uvicorn_runs import Instances

    made = Instances()
    yield made
    made.kill_all()


@pytest.fixture(params=[pytest.param("in-memory"), pytest.param("kernel", marks=pytest.mark.kernel)])
def control_plane(request: pytest.FixtureRequest, short_tmp: Path):
    """Factory like ``supervisor``, for tests of the control plane only: each runs twice, against the
    real loop and broker over the in-memory maps (fast tier: no root, no BPF) and against the real
    supervisor in the running kernel."""
    from helpers.procs import SupervisorProc

    fake = request.param == "in-memory"
    pin_root = short_tmp / "unused-pins" if fake else request.getfixturevalue("pin_root")
    started: list[SupervisorProc] = []

    def start(*, binds: list[str] | None = None, extra: list[str] | None = None) -> SupervisorProc:
        service = f"t{uuid.uuid4().hex[:10]}"
        sup = SupervisorProc(service=service, binds=binds or [f"127.0.0.1:{free_port()}"],
                             control=str(short_tmp / f"{service}.sock"), pin_root=pin_root, extra=extra or [],
                             fake_kernel=fake)
        started.append(sup.start())
        return sup

    yield start
    for sup in started:
        sup.stop()



@pytest.fixture(scope="session")
def nobody_venv():
    """A virtualenv nobody can run (the test virtualenv lives under /root): tests/helpers/venvs.py."""
    from helpers.venvs import build_nobody_venv

    venv, why = build_nobody_venv()
    if venv is None:
        pytest.skip(why)
    yield venv
    shutil.rmtree(venv.parent, ignore_errors=True)
