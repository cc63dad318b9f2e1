"""What users install: the wheel and sdist built from a copy of this tree, checked as an index sees
them (``twine check --strict``), the wheel installed into a fresh virtualenv and run there, the
sdist unpacked and a few of its own tests run from it, and the image's COPY sources built the way
the Containerfile builds them.

Building needs ``build`` and ``twine`` (test extra) and, for the isolated build, PyPI or a
mirror pip is configured for; a missing tool fails with what to install instead of skipping.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.procs import REPO

BPF_FILES = ("standby.bpf.o", "standby.bpf.c", "standby.h")
SKIP_DIRS = (".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis", ".tox")
COPY_IGNORE = shutil.ignore_patterns(*SKIP_DIRS, "*.pyc", "*.egg-info")
VERSION = re.search(r'^__version__ = "([^"]+)"', (REPO / "reuseport_standby" / "__init__.py").read_text(), re.M)[1]


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"python module {module!r} is missing: install the test extra (pip install -e '.[test]')")


def run(cmd: list[str], *, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    if env is None:  # a PYTHONPATH onto a checkout would make pip see the package as installed already
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def copy_tree(dest: Path) -> Path:
    """The project as a clean clone has it (tracked and new files, not what .gitignore hides), or the
    whole tree when this is no git checkout (an unpacked sdist)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, timeout=30) if shutil.which("git") else None
    if listed is None or listed.returncode != 0:
        shutil.copytree(REPO, dest, symlinks=True, ignore=COPY_IGNORE)
        return dest
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = REPO / name
        if (not src.is_symlink() and not src.exists()) or set(Path(name).parts) & set(SKIP_DIRS):
            continue  # deleted in the work tree but not in the index, or a build's leftovers
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            (dest / name).symlink_to(src.readlink())
        else:
            shutil.copy2(src, dest / name)
    return dest


@dataclass
class Dists:
    tree: Path
    wheel: Path
    sdist: Path
    log: str


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    need("build")
    tree = copy_tree(tmp_path_factory.mktemp("tree") / "src")
    out = tree.parent / "dist"
    r = run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)], cwd=tree, timeout=300)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return Dists(tree, wheels[0], sdists[0], r.stdout + r.stderr)


def test_build_is_clean_and_twine_accepts_it(dists: Dists) -> None:
    """No setuptools complaint about what it packages (a data directory that is not a declared
    package, a missing license file), and both files pass the index's own checks."""
    need("twine")
    complaints = [line for line in dists.log.splitlines()
                  if re.search(r"is absent from the .packages. configuration|Package would be ignored|"
                               r"Setuptools\w*Warning|did not match any files|no files found matching", line)]
    assert not complaints, "\n".join(complaints)
    run([sys.executable, "-m", "twine", "check", "--strict", str(dists.wheel), str(dists.sdist)], cwd=dists.tree)


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_metadata_says_where_the_project_lives_and_what_each_extra_is_for(dists: Dists) -> None:
    meta = wheel_metadata(dists.wheel)
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
    assert meta.get_all("License-File") == ["LICENSE"], "the wheel carries no LICENSE (license-files)"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) >= {"Homepage", "Documentation", "Issues", "Changelog"}, urls
    assert all(u.startswith("https://github.com/reuseport-standby/reuseport-standby") for u in urls.values())
    # Every documented way to run has an extra that installs it.
    assert set(meta.get_all("Provides-Extra")) >= {"gunicorn", "uvicorn", "uvicorn-worker", "metrics", "demo", "test"}


def test_long_description_has_no_relative_links(dists: Dists) -> None:
    """The index shows README.md without the repository around it: a relative link or image breaks there."""
    description = wheel_metadata(dists.wheel).get_payload()
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", description)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", description, re.M)
    targets += re.findall(r"""(?:src|href)=["']([^"']+)""", description)
    relative = [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]
    assert not relative, f"README.md links relative paths, broken on the index (use absolute URLs): {relative}"


def test_wheel_holds_the_bpf_object_and_its_source(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
    for name in BPF_FILES:
        info = infos.get(f"reuseport_standby/_bpf/{name}")
        assert info is not None, f"the wheel lacks reuseport_standby/_bpf/{name}"
        assert info.file_size == (REPO / "reuseport_standby" / "_bpf" / name).stat().st_size
    assert "reuseport_standby/py.typed" in infos
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in infos)


def test_wheel_runs_in_a_fresh_virtualenv(dists: Dists, tmp_path: Path) -> None:
    """Installed with nothing else (the package has no dependencies): the command, the loaders'
    imports, and the packaged object and C source as regular files where the loaders look."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps",
         str(dists.wheel)], cwd=tmp_path)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = run([str(venv / "bin" / "reuseport-standby"), "--version"], cwd=tmp_path, env=env)
    assert r.stdout.strip().endswith(VERSION), r.stdout
    probe = (
        "import reuseport_standby, sys\n"
        "from reuseport_standby.kernel.libbpf_loader import packaged_object\n"
        "from reuseport_standby.kernel.bcc_loader import packaged_source\n"
        "obj, src = packaged_object(), packaged_source()\n"
        "for p in (obj, src, src.parent / 'standby.h'):\n"
        "    assert p.is_file() and not p.is_symlink(), p\n"
        "    assert p.is_relative_to(sys.prefix), (p, sys.prefix)\n"
        "assert obj.read_bytes()[:4] == b'\\x7fELF'\n"
        "assert 'SEC(' in src.read_text()\n"
        "print(reuseport_standby.__file__)\n"
    )
    r = run([str(py), "-I", "-c", probe], cwd=tmp_path, env=env)
    assert r.stdout.strip().startswith(str(venv)), r.stdout


def test_sdist_is_the_whole_project_and_its_tests_run(dists: Dists, tmp_path: Path) -> None:
    """Every test file with what it imports and reads (conftest, helpers, apps, examples, bpf/), no
    symlink; then tests that read the C header and the examples run from the unpacked sdist."""
    with tarfile.open(dists.sdist) as t:
        members = t.getmembers()
        links = [m.name for m in members if m.issym() or m.islnk()]
        assert not links, f"the sdist holds links: {links}"
        # Debian 12's Python 3.11.2 predates extraction filters; the archive was just checked for links.
        t.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    root = tmp_path / dists.sdist.name.removesuffix(".tar.gz")
    for sub in ("tests", "examples", "bench", "scripts", "bpf", "reuseport_standby"):
        wanted = {p.relative_to(dists.tree) for p in (dists.tree / sub).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and "results" not in p.parts}
        have = {p.relative_to(root) for p in (root / sub).rglob("*") if p.is_file()}
        assert wanted <= have, f"the sdist lacks {sorted(map(str, wanted - have))}"
    for name in ("LICENSE", "README.md", "Makefile", "tox.ini", "pyproject.toml"):
        assert (root / name).is_file(), name
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(root)}
    # Fast ones that read the C header (bpf/) and the examples; hypothesis-driven files take minutes.
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not kernel",
             "tests/test_protocol.py::test_layout_matches_c_header",
             "tests/test_deployment.py::test_containerfile_lints_and_copies_what_exists"], cwd=root, env=env)
    assert re.search(r"\d+ passed", r.stdout) and "failed" not in r.stdout, r.stdout
    r = run([sys.executable, "-c", "import reuseport_standby; print(reuseport_standby.__file__)"], cwd=root, env=env)
    assert r.stdout.strip().startswith(str(root)), r.stdout


def containerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    need("dockerfile")
    import dockerfile

    cmds = dockerfile.parse_file(str(REPO / "examples" / "kubernetes" / "Containerfile"))
    return [(list(c.value[:-1]), c.value[-1]) for c in cmds
            if c.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in c.flags)]


def test_image_copies_real_files_and_builds_with_the_c_source(tmp_path: Path) -> None:
    """COPY keeps a symlink as a link (dangling in the image), so every file the Containerfile copies
    must be a regular file; then what it copies to /src is built as its ``pip install /src`` does,
    and the wheel must hold the BPF object and its C source."""
    copies = containerfile_copies()
    files = [p for srcs, _ in copies for s in srcs for p in ([REPO / s] if not (REPO / s).is_dir()
                                                           else (REPO / s).rglob("*"))
             if "__pycache__" not in p.parts]
    links = [str(p.relative_to(REPO)) for p in files if p.is_symlink()]
    assert not links, f"the image would get dangling links instead of files: {links}"
    image = tmp_path / "image"
    for srcs, dest in copies:
        if not dest.startswith("/src"):
            continue  # the app, not the package
        for s in srcs:
            # COPY a b /dir/ puts each into /dir; COPY dir /x/dir copies dir's content to /x/dir.
            target = image / dest.lstrip("/") / (Path(s).name if dest.endswith("/") else "")
            if (REPO / s).is_dir():
                shutil.copytree(REPO / s, target, symlinks=True, ignore=COPY_IGNORE)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / s, target)
    src = image / "src"
    need("build")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [n for n in BPF_FILES if f"reuseport_standby/_bpf/{n}" not in names]
    assert not missing, f"the image's package would lack {missing}"


def test_tested_ranges_agree_everywhere(dists: Dists) -> None:
    """Every extra bounds gunicorn, uvicorn and uvicorn-worker on both sides with the same range, and
    tox's compat-oldest pins each lower bound, so the lower bound is what was tested."""
    need("packaging")
    from packaging.requirements import Requirement

    servers = {"gunicorn", "uvicorn", "uvicorn-worker"}
    bounds: dict[str, set[tuple[str, str]]] = {}
    for line in wheel_metadata(dists.wheel).get_all("Requires-Dist"):
        req = Requirement(line)
        if req.name not in servers:
            continue
        low = [s.version for s in req.specifier if s.operator == ">="]
        high = [s.version for s in req.specifier if s.operator == "<"]
        assert len(low) == 1 and len(high) == 1, f"{line}: needs a tested range (>=low,<high)"
        bounds.setdefault(req.name, set()).add((low[0], high[0]))
    assert set(bounds) == servers and all(len(b) == 1 for b in bounds.values()), \
        f"the extras disagree on the ranges: {bounds}"
    tox = (REPO / "tox.ini").read_text()
    for dist, ((low, _),) in bounds.items():
        assert re.search(rf"^\s*{re.escape(dist)}=={re.escape(low)}(\.0)*\s*$", tox, re.M), \
            f"tox.ini's compat-oldest does not pin {dist}=={low}"
