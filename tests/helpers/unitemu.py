"""Run a systemd unit file's service the way systemd would, on a machine without systemd as PID 1.

This machine has no running systemd (PID 1 is not systemd, so
``systemctl``/``systemd-run`` cannot start anything), so the tests of
docs/deployment.md's systemd path read the shipped unit files and carry
out what matters for privileges and process life with ``setpriv`` and
signals:

- ``User=``, ``Group=``, ``SupplementaryGroups=`` (uid, gid, groups);
- ``CapabilityBoundingSet=``, ``AmbientCapabilities=``, ``NoNewPrivileges=``;
- ``Environment=``, ``EnvironmentFile=``, ``WorkingDirectory=``,
  ``RuntimeDirectory=`` (+ ``Mode``), specifiers ``%i %I %n %%`` and
  ``$VAR``/``${VAR}`` expansion in command lines, ``$MAINPID``;
- ``Type=notify`` (waits for READY=1 on a ``NOTIFY_SOCKET``) and ``Type=exec``,
  ``ExecStartPost=`` (must exit 0), ``KillMode=`` (``mixed``: SIGTERM to the
  main process; ``control-group``: to every process of the unit) with
  ``TimeoutStopSec=`` and the final SIGKILL.  The unit's "control group" is
  its session: every process is started with ``start_new_session``.

Not emulated: the mount-namespace and seccomp options (ProtectSystem=,
PrivateTmp=, RestrictAddressFamilies=...), ``Restart=``.  Paths are mapped
by prefix (``/opt/myapp/venv/`` to a real virtualenv, ``/run/`` to a
temporary directory...); nothing else of the unit files is changed.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):  # continuation
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {line!r} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every assignment of a list setting; an empty assignment resets the list (systemd's rule)."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else out + [v]
    return out


def value(unit: dict[str, list[tuple[str, str]]], section: str, key: str, default: str | None = None) -> str | None:
    found = [v for k, v in unit.get(section, []) if k == key]
    return found[-1] if found else default


def expand_specifiers(text: str, name: str, instance: str) -> str:
    table = {"i": instance, "I": instance, "n": name, "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def expand_command(line: str, env: dict[str, str]) -> list[str]:
    """systemd's rules: ``${VAR}`` is one word, ``$VAR`` splits into words; a leading ``-``/``+``... prefix is refused."""
    assert line[:1] not in "-@:+!", f"command prefixes are not emulated: {line}"
    words: list[str] = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
                                lambda m: env.get(m.group(1) or m.group(2), ""), word))
    return words


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip().strip('"')
    return env


def cap_list(text: str) -> list[str]:
    return [c.lower().removeprefix("cap_") for c in text.split()]


@dataclass
class EmulatedUnit:
    """One instance of a (template) service unit, started and stopped as systemd would."""

    path: Path
    instance: str
    path_map: dict[str, str]                                # prefix -> replacement, for paths in the unit
    user_map: dict[str, str] = field(default_factory=dict)   # user names in the unit -> users of this machine
    group_map: dict[str, str] = field(default_factory=dict)  # group names in the unit -> groups of this machine
    env_overrides: dict[str, str] = field(default_factory=dict)
    exec_start: str | None = None                           # replace ExecStart= (as written in a unit file)
    kill_mode: str | None = None                            # replace KillMode=
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    unit: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unit = parse_unit(self.path)
        self.name = self.path.name.replace("@.", f"@{self.instance}.")

    # -- reading the unit --------------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        v = value(self.unit, "Service", key, default)
        return None if v is None else self.map_path(expand_specifiers(v, self.name, self.instance))

    def settings(self, key: str) -> list[str]:
        return [self.map_path(expand_specifiers(v, self.name, self.instance)) for v in values(self.unit, "Service", key)]

    def map_path(self, text: str) -> str:
        for prefix, repl in self.path_map.items():
            text = re.sub(r"(?<![\w/])" + re.escape(prefix), lambda _m, r=repl: r, text)
        return text

    @property
    def user(self) -> str:
        u = self.setting("User") or "root"
        return self.user_map.get(u, u)

    @property
    def group(self) -> str:
        g = self.setting("Group")
        return self.group_map.get(g, g) if g else grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
        if self.setting("User"):
            pw = pwd.getpwnam(self.user)
            env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir, SHELL=pw.pw_shell)
        for item in self.settings("Environment"):
            for assignment in shlex.split(item):
                k, _, v = assignment.partition("=")
                env[k] = v
        for f in self.settings("EnvironmentFile"):
            env.update(read_env_file(Path(f.lstrip("-"))))
        env.update({k: self.map_path(v) for k, v in self.env_overrides.items()})
        env.update(extra or {})
        return env

    def privileges(self) -> list[str]:
        """setpriv arguments for User/Group/SupplementaryGroups/capabilities/NoNewPrivileges."""
        args = ["setpriv"]
        supplementary = [grp.getgrnam(self.group_map.get(g, g)).gr_gid for s in self.settings("SupplementaryGroups")
                         for g in s.split()]
        if self.setting("User"):
            pw = pwd.getpwnam(self.user)
            groups = os.getgrouplist(pw.pw_name, grp.getgrnam(self.group).gr_gid) + supplementary
            args += ["--reuid", str(pw.pw_uid), "--regid", str(grp.getgrnam(self.group).gr_gid),
                     "--groups", ",".join(map(str, sorted(set(groups))))]
        elif supplementary:
            args += ["--groups", ",".join(map(str, supplementary))]
        else:
            args += ["--clear-groups"]
        bounding = self.setting("CapabilityBoundingSet")
        if bounding is not None:
            args += ["--bounding-set", ",".join(["-all", *("+" + c for c in cap_list(bounding))])]
        ambient = cap_list(" ".join(self.settings("AmbientCapabilities")))
        caps = ",".join(["-all", *("+" + c for c in ambient)])
        args += ["--inh-caps", caps, "--ambient-caps", caps]
        if (self.setting("NoNewPrivileges") or "no").lower() in ("yes", "true", "1", "on"):
            args.append("--no-new-privs")
        return args + ["--"]

    # -- life cycle ----------------------------------------------------------------------
    def _runtime_dirs(self) -> None:
        mode = int(self.setting("RuntimeDirectoryMode", "0755") or "0755", 8)
        base = self.map_path("/run/")
        for name in " ".join(self.settings("RuntimeDirectory")).split():
            d = Path(base) / name
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
            if self.setting("User"):
                os.chown(d, pwd.getpwnam(self.user).pw_uid, grp.getgrnam(self.group).gr_gid)

    def start(self, timeout: float = 60.0) -> EmulatedUnit:
        self._runtime_dirs()
        env = self.environment()
        line = self.setting("ExecStart") or ""
        if self.exec_start is not None:
            line = self.map_path(expand_specifiers(self.exec_start, self.name, self.instance))
        cmd = expand_command(line, env)
        cwd = self.setting("WorkingDirectory") or "/"
        kind = self.setting("Type", "simple")
        notify = None
        if kind == "notify":
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            npath = f"/tmp/rs-notify-{os.getpid()}-{time.monotonic_ns()}"
            notify.bind(npath)
            os.chmod(npath, 0o777)
            env["NOTIFY_SOCKET"] = npath
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.privileges() + cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        try:
            if notify is not None:
                notify.settimeout(timeout)
                deadline = time.monotonic() + timeout
                while True:
                    msg = notify.recv(4096).decode()
                    if "READY=1" in msg.split("\n"):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name}: no READY=1")
        finally:
            if notify is not None:
                notify.close()
                os.unlink(env["NOTIFY_SOCKET"])
        for post in self.settings("ExecStartPost"):
            post_env = {**env, "MAINPID": str(self.proc.pid)}
            r = subprocess.run(self.privileges() + expand_command(post, post_env), env=post_env, cwd=cwd,
                               capture_output=True, text=True, timeout=timeout + 10)
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: ExecStartPost failed ({r.returncode}): {r.stderr}\n{self.log()[-3000:]}")
        return self

    def stop(self) -> int | None:
        """KillMode= and TimeoutStopSec= as systemd applies them; returns the main process's status."""
        if self.proc is None:
            return None
        mode = self.kill_mode or self.setting("KillMode", "control-group")
        timeout = float((self.setting("TimeoutStopSec", "90s") or "90s").rstrip("s"))
        sig = getattr(signal, self.setting("KillSignal", "SIGTERM") or "SIGTERM")
        if self.proc.poll() is None:
            if mode == "control-group":
                os.killpg(self.proc.pid, sig)
            elif mode in ("mixed", "process"):
                self.proc.send_signal(sig)
            else:
                raise ValueError(f"KillMode={mode} is not emulated")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if mode != "process":
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the final SIGKILL to whatever is left
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        return self.proc.returncode

    def restart(self) -> EmulatedUnit:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
