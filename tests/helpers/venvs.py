"""A virtualenv that ``nobody`` can run: instances started as an unprivileged user cannot read this
checkout's interpreter (it lives under /root).  Made from the system Python, its ``.pth`` points at
this checkout and at the test virtualenv's site-packages -- the shape of ``/opt/myapp/venv`` in the docs."""

from __future__ import annotations

import grp
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from helpers.procs import REPO

SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_BIN = Path(sys.executable).parent
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid


def build_nobody_venv() -> tuple[Path | None, str]:
    """(the virtualenv, "") or (None, why it cannot be made here).  The caller removes ``venv.parent``."""
    if not SYSTEM_PYTHON.exists():
        return None, "no system python3 to build a virtualenv that nobody can read"
    ver = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.strip()
    if ver != "%d.%d" % sys.version_info[:2]:
        return None, f"system python is {ver}, this virtualenv {sys.version_info[:2]}: its packages would not import"
    base = Path(tempfile.mkdtemp(prefix="rs-venv-", dir="/tmp"))
    base.chmod(0o755)
    venv = base / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    (site / "reuseport_standby_checkout.pth").write_text(f"{REPO}\nimport site; site.addsitedir({ours!r})\n")
    for script in ("gunicorn", "reuseport-standby"):
        text = (VENV_BIN / script).read_text().splitlines(keepends=True)
        (venv / "bin" / script).write_text(f"#!{venv / 'bin' / 'python'}\n" + "".join(text[1:]))
        (venv / "bin" / script).chmod(0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP), "--clear-groups", "--",
                        str(venv / "bin" / "python"), "-c", "import reuseport_standby, gunicorn, uvicorn, flask"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    if r.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        return None, f"nobody cannot import this checkout: {r.stderr[-500:]}"
    return venv, ""
