"""``reuseport-standby init``: the literal ``gunicorn -c reuseport_standby.conf APP`` in a user's project,
with the project's own gunicorn config still applied (issue 17, item 8). Real gunicorn, real supervisor."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers.procs import REPO
from helpers.servers import BIN, InstanceProc, worker_pids

APP = '''\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"project app\\n"]
'''

PROJECT_CONFIG = '''\
workers = 3
bind = "0.0.0.0:1"   # ignored: the supervisor decides


def post_worker_init(worker):
    worker.log.info("project hook: worker %s", worker.pid)
'''

LITERAL = [str(BIN / "gunicorn"), "-c", "reuseport_standby.conf", "app:app"]


def init(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reuseport_standby", "init", *args], cwd=project,
                          capture_output=True, text=True, timeout=60)


def get(sup) -> str:
    with urllib.request.urlopen(f"http://{sup.binds[0]}/", timeout=5) as r:
        return r.read().decode()


def test_init_refuses_to_overwrite_and_a_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    assert init(tmp_path).returncode == 0
    again = init(tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr, again.stderr
    missing = init(tmp_path, "--force", "--config", "nope.py")
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    assert init(tmp_path, "--force").returncode == 0


def test_the_literal_command_works_after_init_with_the_projects_config_composed(
        supervisor, short_tmp: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text(APP)
    (project / "gunicorn.conf.py").write_text(PROJECT_CONFIG)
    sup = supervisor()
    env = {"XDG_RUNTIME_DIR": str(short_tmp)}

    # Contrast: without the file, gunicorn takes the name as a path and fails.
    before = subprocess.run(LITERAL + ["--check-config"], cwd=project, capture_output=True, text=True, timeout=60,
                            env={"PATH": str(BIN), "REUSEPORT_STANDBY_ROLE": "primary", **sup.env})
    assert before.returncode != 0 and "doesn't exist" in before.stderr + before.stdout, before

    r = init(project)
    assert r.returncode == 0 and "includes gunicorn.conf.py" in r.stdout, r.stderr
    inst = InstanceProc(LITERAL, sup, "primary", env=env, cwd=project).start()
    try:
        inst.wait_active()
        assert get(sup) == "project app\n"
        assert inst.proc is not None
        deadline = time.monotonic() + 20
        while len(worker_pids(inst.proc)) != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker_pids(inst.proc)) == 3, "the project's workers = 3 was not applied"
        deadline = time.monotonic() + 20
        while inst.log().count("project hook: worker") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        log = inst.log()
        assert log.count("project hook: worker") == 3, log[-3000:]
        assert "sets bind; ignored" in log, log[-3000:]
        mine = [i for i in sup.status()["instances"] if i["pid"] == inst.proc.pid]
        assert len(mine) == 1 and mine[0]["state"] == "active", mine
    finally:
        inst.stop()


def test_a_project_config_that_already_composes_ours_is_not_composed_twice(
        supervisor, short_tmp: Path, tmp_path: Path) -> None:
    """The Flask example's gunicorn.conf.py star-imports our settings and composes a hook itself: included
    as it is by the written file (not wrapped in ours again), the instance serves and its hook runs."""
    project = tmp_path / "flask_app"
    shutil.copytree(REPO / "examples" / "flask_app", project)
    sup = supervisor()
    assert init(project).returncode == 0
    inst = InstanceProc(LITERAL, sup, "standby", env={"XDG_RUNTIME_DIR": str(short_tmp)}, cwd=project).start()
    try:
        inst.wait_active()
        assert "flask example: worker" in inst.log()
        assert inst.proc is not None
        assert [i["state"] for i in sup.status()["instances"] if i["pid"] == inst.proc.pid] == ["active"]
        assert "composed" not in inst.log() and "Traceback" not in inst.log(), inst.log()[-3000:]
    finally:
        inst.stop()
