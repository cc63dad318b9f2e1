"""Every error a user meets names a section of docs/troubleshooting.md that exists, and every section is named.

The anchors are read from the source (``see="..."`` at a raise site, a class's ``see = "..."``, and
``see_doc("...")`` in a logged or relayed message), so a new error without a section, or a section
whose error was removed, fails here.  The failures that are cheap to cause for real are caused, and
their messages checked for the pointer.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reuseport_standby.errors import (TROUBLESHOOTING, BpfUnavailable, ProtocolError, ReuseportStandbyError,
                                      SupervisorUnavailable, see_doc)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "reuseport_standby"
DOC = REPO / TROUBLESHOOTING
_ANCHOR_IN_CODE = re.compile(r"""\bsee(?:_doc\(|\s*=\s*)["']([a-z0-9_-]+)["']""")
_NAMED_CONSTANT = re.compile(r"""^_[A-Z]+\s*=\s*["']([a-z0-9_-]+)["']\s*#.*troubleshooting""", re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def doc_sections() -> dict[str, str]:
    """Anchor -> body of each '## ' section."""
    sections: dict[str, str] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = github_slug(line[3:])
            assert current not in sections, f"two sections with the anchor {current}"
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def code_anchors() -> dict[str, list[str]]:
    """Anchor -> the files naming it (cli.py is not ours to annotate and names none)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for anchor in _ANCHOR_IN_CODE.findall(text) + _NAMED_CONSTANT.findall(text):
            found.setdefault(anchor, []).append(str(path.relative_to(REPO)))
    return found


def test_slug_is_githubs() -> None:
    assert github_slug("Kernel older than 5.14") == "kernel-older-than-514"
    assert github_slug("Port held by a socket without SO_REUSEPORT") == "port-held-by-a-socket-without-so_reuseport"
    assert github_slug("`run` cannot start the command") == "run-cannot-start-the-command"


def test_every_anchor_in_the_code_is_a_section_and_every_section_is_named() -> None:
    sections, anchors = doc_sections(), code_anchors()
    assert len(anchors) >= 15, anchors  # the scan itself works
    missing = {a: files for a, files in anchors.items() if a not in sections}
    assert not missing, f"errors point to sections {TROUBLESHOOTING} lacks: {missing}"
    orphans = set(sections) - set(anchors)
    assert not orphans, f"sections no error points to: {orphans}"


def test_every_section_has_the_message_cause_confirmation_and_fix() -> None:
    for anchor, body in doc_sections().items():
        for part in ("**Message**", "**Cause**", "**Confirm**", "**Fix**"):
            assert part in body, f"section #{anchor} lacks {part}"
        assert "```" in body, f"section #{anchor} quotes no message or command"


def test_the_issue_list_is_covered() -> None:
    """The sections issue 17 asked for by name."""
    want = {"bpffs-not-mounted", "kernel-older-than-514", "libbpf-missing-or-too-old",
            "bcc-module-or-kernel-headers-missing", "uid-mismatch-in-the-reuseport-group",
            "port-held-by-a-socket-without-so_reuseport", "control-socket-permissions", "slots-full",
            "supervisor-not-running"}
    assert want <= set(doc_sections())


def test_the_pointer_is_one_line_at_the_end_of_the_first_line() -> None:
    assert str(SupervisorUnavailable("no supervisor.")) == f"no supervisor ({see_doc('supervisor-not-running')})"
    assert str(ReuseportStandbyError("plain")) == "plain"  # no section: no pointer
    multi = str(BpfUnavailable("the verifier rejected it; its last lines:\n  R1 invalid", see="the-program-does-not-load"))
    assert multi.splitlines()[0].endswith("(see docs/troubleshooting.md#the-program-does-not-load)")
    relayed = ProtocolError("SlotsFull", str(ReuseportStandbyError("all taken", see="slots-full")), see="slots-full")
    assert str(relayed).count("(see ") == 1  # relayed by the supervisor, it is not pointed twice


def test_bpffs_missing_names_its_section(tmp_path: Path) -> None:
    from reuseport_standby.kernel.pins import check_bpffs

    with pytest.raises(BpfUnavailable) as err:
        check_bpffs(str(tmp_path / "pins"))
    assert str(err.value).endswith("(see docs/troubleshooting.md#bpffs-not-mounted)")


def test_libbpf_too_old_is_refused_by_version(tmp_path: Path) -> None:
    """A real shared library answering version 0.5 (Ubuntu 22.04's libbpf0) found first by the dynamic
    linker: refused by name and version, in one line, instead of half working with 0.x's errno convention."""
    src = tmp_path / "v.c"
    src.write_text("unsigned libbpf_major_version(void) { return 0; }\n"
                   "unsigned libbpf_minor_version(void) { return 5; }\n")
    for name in ("libbpf.so.1", "libbpf.so.0"):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / name), str(src)], check=True)
    code = "from reuseport_standby.kernel import libbpf; libbpf.load()"
    env = {"LD_LIBRARY_PATH": str(tmp_path), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "libbpf.so.1 is libbpf 0.5" in last and "1.0 or later is needed" in last, r.stderr
    assert last.endswith("(see docs/troubleshooting.md#libbpf-missing-or-too-old)"), last


def test_port_held_without_so_reuseport_names_its_section() -> None:
    """A plain listener (no SO_REUSEPORT) of our own uid holds the port: the supervisor's bind fails
    with EADDRINUSE and the message tells this case from a listener of another uid."""
    from reuseport_standby.kernel.sockets import Address, create_listener
    from reuseport_standby.supervisor.broker import listen_error

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = Address("127.0.0.1", holder.getsockname()[1])
        with pytest.raises(OSError) as bind:
            create_listener(address).close()
        message = str(listen_error(address, bind.value))
    assert "without SO_REUSEPORT" in message
    assert message.endswith("(see docs/troubleshooting.md#port-held-by-a-socket-without-so_reuseport)")


@pytest.mark.kernel  # needs root, to run a process as nobody
def test_port_of_another_uid_names_the_uid_section(nobody_python: list[str]) -> None:
    """A SO_REUSEPORT listener of user nobody holds the port; ours (root) cannot join its group."""
    from reuseport_standby.kernel.sockets import Address, create_listener
    from reuseport_standby.supervisor.broker import listen_error

    holder = subprocess.Popen(
        [*nobody_python, "-c",
         "import socket, sys, time\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
         "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        address = Address("127.0.0.1", int(holder.stdout.readline()))
        with pytest.raises(OSError) as bind:
            create_listener(address).close()
        message = str(listen_error(address, bind.value))
    finally:
        holder.kill()
        holder.wait(10)
    assert "belong to uid 65534" in message
    assert message.endswith("(see docs/troubleshooting.md#uid-mismatch-in-the-reuseport-group)")


@pytest.fixture
def nobody_python() -> list[str]:
    """The system Python as user nobody (this checkout is world-readable; the test virtualenv is not)."""
    import os

    if os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run a process as nobody")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3"]


def test_no_supervisor_names_its_section(tmp_path: Path) -> None:
    """``status`` of a service nobody supervises: exit 3, one line, the pointer."""
    code = "import sys; from reuseport_standby.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "check", "--service", "nosuch",
                        "--control", str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and "#supervisor-not-running" in r.stderr, r.stderr


def test_old_kernel_warns_and_names_its_section(pin_root: Path) -> None:
    """The kernel's uname says 2.6 (``setarch --uname-2.6``, a real personality flag): the program loads
    as plain SELECT on this kernel, with the warning that names its section."""
    import os

    if not shutil.which("setarch"):
        pytest.skip("needs setarch (util-linux)")
    code = ("import logging, sys; logging.basicConfig()\n"
            "from reuseport_standby.kernel.group import Group\n"
            "with Group.open(sys.argv[1]) as g: print('migrate', g.migrate)")
    r = subprocess.run(["setarch", os.uname().machine, "--uname-2.6", sys.executable, "-c", code,
                        str(pin_root / "old-kernel")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "migrate False" in r.stdout, r.stdout + r.stderr
    assert "is older than 5.14: no listener migration" in r.stderr, r.stderr
    assert "(see docs/troubleshooting.md#kernel-older-than-514)" in r.stderr, r.stderr


def test_bcc_without_headers_names_its_section(pin_root: Path, short_tmp: Path) -> None:
    """BCC installed, but no headers for the running kernel (it reports 2.6 under ``setarch``): the
    supervisor refuses in one line that names the section, before compiling anything."""
    import os

    from conftest import free_port, require_bcc

    require_bcc()
    if not shutil.which("setarch"):
        pytest.skip("needs setarch (util-linux)")
    code = "import sys; from reuseport_standby.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(["setarch", os.uname().machine, "--uname-2.6", sys.executable, "-c", code, "supervise",
                        "--service", "hdr", "--bind", f"127.0.0.1:{free_port()}", "--loader", "bcc",
                        "--pin-root", str(pin_root), "--control", str(short_tmp / "c.sock")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("reuseport-standby: ")]
    assert "BCC compiles against kernel headers" in line and "linux-headers" in line, line
    assert line.endswith("(see docs/troubleshooting.md#bcc-module-or-kernel-headers-missing)"), line


def test_a_client_in_time_wait_on_the_port_names_the_port_section() -> None:
    """An outgoing connection that had the port as its local port, closed first by the client, sits in
    TIME-WAIT; the kernel keeps a listener off the port meanwhile.  The message says so."""
    from reuseport_standby.kernel.sockets import Address, create_listener
    from reuseport_standby.supervisor.broker import listen_error

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        address = Address("127.0.0.1", client.getsockname()[1])
        accepted, _ = server.accept()
        client.close()  # the client's side, holding the port, enters TIME-WAIT
        accepted.close()
    with pytest.raises(OSError) as bind:
        create_listener(address).close()
    message = str(listen_error(address, bind.value))
    assert "TIME-WAIT" in message and message.endswith("#port-held-by-a-socket-without-so_reuseport)"), message
