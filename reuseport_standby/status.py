"""``reuseport-standby status``: what the supervisor, or failing that the pins, say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import client, protocol
from .kernel import diag
from .errors import ControlSocketDenied, ReuseportStandbyError, SupervisorUnavailable
from .kernel.pins import DEFAULT_PIN_ROOT
from .kernel.group import Group
from .kernel.sockets import Address
from .supervisor.view import address_status


def instance_state(doc: dict[str, Any], pid: int) -> str | None:
    """The state the status document gives the instance whose process is ``pid`` (None: unknown).

    The one answer to "is pid P active?", for ``check``, ``run``, the tests and the benchmarks."""
    return next((i["state"] for i in doc.get("instances", []) if i["pid"] == pid), None)


def collect(service: str, control: str | None = None, pin_root: str = DEFAULT_PIN_ROOT) -> dict[str, Any]:
    try:
        return {"source": "supervisor", **client.query(service, "status", control)["status"]}
    except ControlSocketDenied:
        raise  # the supervisor may well run: say so rather than show the pins as if it did not
    except SupervisorUnavailable as exc:
        st = offline(service, pin_root, reason=str(exc))
        run = run_report(service, control)
        if run is not None:
            st["run"] = run
        return st


def run_report(service: str, control: str | None) -> dict[str, Any] | None:
    """What a ``reuseport-standby run`` of this service says of its supervisor (None: no run answers).

    The runner restarts a dead or unreachable supervisor with backoff; while it cannot, this is
    where the operator sees why: the supervisor itself is not there to say."""
    from .run_client import run_status

    try:
        return run_status(service, control, timeout=2)
    except (ReuseportStandbyError, OSError, KeyError):
        return None


def offline(service: str, pin_root: str, reason: str) -> dict[str, Any]:
    """Read the pinned maps directly: traffic may well be flowing without a supervisor."""
    base = Path(pin_root) / protocol.check_service(service)
    try:
        if not base.is_dir():
            raise SupervisorUnavailable(f"{reason}; and nothing is pinned for service {service!r} at {base}")
        pins = sorted(base.iterdir())
    except PermissionError as exc:
        raise SupervisorUnavailable(
            f"{reason}; and the pins at {base} cannot be read ({exc.filename}: {exc.strerror}). systemd mounts "
            f"{DEFAULT_PIN_ROOT.rsplit('/', 1)[0]} with mode 0700: run this as root, or let the service's group "
            f"read status while the supervisor is down by allowing traversal (docs/deployment.md)") from None
    queues = diag.listeners()
    addresses = []
    for pin in pins:
        try:
            address = Address.parse(pin.name.replace("_", "."))
            with Group.adopt(pin) as group:
                addresses.append(address_status(address, group, queues))
        except (OSError, ValueError, ReuseportStandbyError) as exc:  # a partial or foreign pin directory
            raise SupervisorUnavailable(
                f"{reason}; and {pin} is not a complete pin directory of this program ({exc}): start the "
                f"supervisor of service {service!r}, or remove {base} if the service is gone") from None
    return {"source": "pins", "service": service, "supervisor": None, "supervisor_error": reason,
            "addresses": addresses, "instances": []}


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (ESC as ``\\x1b``, a newline as ``\\n``, a bidi
    override as ``\\u202e``...).  Names and reasons in a status document come from peers (and a document from
    an older supervisor may carry them unchecked): none may move the cursor, recolour the terminal, or make
    a line of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(st: dict[str, Any]) -> str:
    """The human view: every line escaped whole (``printable``), so no string in it reaches the terminal raw."""
    return "\n".join(printable(line) for line in _lines(st))


def _lines(st: dict[str, Any]) -> list[str]:
    lines = [f"service {st['service']}"]
    sup = st.get("supervisor")
    if sup:
        lines.append(f"  supervisor pid {sup['pid']}, up {sup['uptime_s']} s, control {sup['control']}")
    else:
        lines.append(f"  supervisor NOT RUNNING ({st.get('supervisor_error')}); state read from pins")
    run = st.get("run")
    if run:
        rs = run.get("supervisor") or {}
        inst = ", ".join(f"{role} pid {i['pid']}" for role, i in sorted((run.get("instances") or {}).items()) if i)
        lines.append(f"  run pid {run.get('pid')}: supervisor {rs.get('state')}"
                     + (f" for {rs['down_for_s']} s" if rs.get("down_for_s") is not None else "")
                     + f", {rs.get('failed_attempts', 0)} failed restart(s) in a row"
                     + (f", next attempt in {rs['next_attempt_in_s']} s" if rs.get("next_attempt_in_s") is not None else "")
                     + f"; instances: {inst or 'none'}")
        if rs.get("last_error"):
            lines.append(f"    last error: {rs['last_error']}")
    instances = st.get("instances", [])
    heads = {i["pid"] for i in instances if i.get("scope") == "worker"}
    workers: dict[int, list[dict[str, Any]]] = {}
    for inst in instances:
        if inst.get("parent") in heads:
            workers.setdefault(inst["parent"], []).append(inst)
    for inst in instances:
        if inst.get("parent") in heads:
            continue  # listed under its instance
        if inst.get("scope") == "worker":
            mine = workers.get(inst["pid"], [])
            active = sum(1 for w in mine if w["state"] == "active")
            lines.append(f"  instance {inst['id']}: {inst['role']} pid {inst['pid']} {inst['state']}"
                         f" (worker scope: {active} of {len(mine)} worker(s) active)"
                         + (f" [{inst['name']}]" if inst.get("name") else ""))
            for w in mine:
                lines.append("    worker " + _instance_line(w, with_role=False))
            lines.extend(_requests_line([inst, *mine]))
        else:
            lines.append("  instance " + _instance_line(inst)
                         + (f" (worker of pid {inst['parent']})" if inst.get("parent") else ""))
            lines.extend(_requests_line([inst]))
    for a in st["addresses"]:
        park = a["parking"]
        lines.append(f"  {a['address']}  mode {a['mode']}  prog {a['prog_id']}  standby weight {a['standby_weight']}%"
                     + ("  (roles swapped by promote)" if a.get("roles_swapped") else ""))
        lines.append(f"    parking: {'slotted' if park['slotted'] else 'EMPTY'}, queued {park['queued']}")
        for s in a["slots"]:
            owner = f"instance {s['instance']}" if s.get("instance") else "unclaimed"
            lines.append(f"    slot {s['slot']:>2} {s['role']:<7} {owner:<12} queued {s['queued']}/{s['backlog']}"
                         f"  connections {s['connections']}" + ("  DISABLED" if s.get("disabled") else ""))
        counters = "  ".join(f"{k}={v}" for k, v in a["counters"].items())
        lines.append(f"    counters: {counters}")
        integrity = a.get("program_integrity")
        if integrity and integrity.get("restorations"):
            lines.append(f"    PROGRAM RESTORED {integrity['restorations']} time(s): at least "
                         f"{integrity['bypassed_connections']} connection(s) were chosen without it "
                         f"(a member of --group detached it; docs/security.md)")
    return lines


def _instance_line(inst: dict[str, Any], with_role: bool = True) -> str:
    slots = ", ".join(f"{a} slot {s}" for a, s in inst["slots"].items()) or "no slots"
    queues = ", ".join(f"{a} queue {q['queued']}" for a, q in inst["queues"].items())
    role = f"{inst['role']} " if with_role else ""
    return (f"{inst['id']}: {role}pid {inst['pid']} {inst['state']} ({slots}; {queues})"
            + (f" [{inst['name']}]" if inst.get("name") else "")
            + (f" demoted: {inst['demoted_for']}" if inst.get("demoted_for") else ""))


def _requests_line(entries: list[dict[str, Any]]) -> list[str]:
    """One line of what an instance (its entry and its workers') answered: requests, error rate, p99, version.
    Nothing for a status document without outcomes (an older supervisor), or a malformed one."""
    from .outcomes import Outcomes

    total = Outcomes()
    try:
        for e in entries:
            if "outcomes" in e:
                total = total + Outcomes.from_wire(e["outcomes"])
    except ValueError:
        return []
    version = entries[0].get("version")
    if not total.requests and not version:
        return []
    rate, p99 = total.error_rate(), total.quantile(0.99)
    text = f"requests {total.requests}"
    if total.requests:
        text += f", errors {total.errors} ({rate:.2%}), p99 {p99 * 1000:.3g} ms" if rate is not None and p99 else ""
    return [f"    {text}" + (f"; version {version}" if version else "")]


def dumps(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=2, sort_keys=True)
