"""Operator commands: weight, drain, undrain, promote.

Each changes the program's config only (a flag, a mask, a weight): no
socket moves, so each takes effect for the next connection.

Only operators may send them: root, the supervisor's own user, and members
of ``--admin-group`` (``Instance.admin``, decided once at connect from the
credentials the kernel recorded).  Membership of ``--group`` alone lets a
peer register instances and read ``status``, nothing more.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..errors import ProtocolError
from ..kernel.layout import FLAG_SWAP_ROLES
from ..names import Role, Scope, State
from .registry import Instance

if TYPE_CHECKING:
    from .broker import Broker

log = logging.getLogger("reuseport_standby.supervisor")


def run(broker: "Broker", caller: Instance, req: protocol.Request) -> dict[str, Any]:
    check_operator(broker, caller, req.op)
    if req.op == "weight":
        return weight(broker, caller, req)
    if req.op == "promote":
        return promote(broker, caller)
    if req.op == "drain":
        return drain(broker, caller, req)
    return undrain(broker, caller, req)


def check_operator(broker: "Broker", caller: Instance, op: str) -> None:
    """Refuse an operator command from a peer that is no operator, saying who may and how to become one."""
    if caller.admin:
        return
    raise ProtocolError(
        "forbidden", f"'{op}' is an operator command and uid {caller.uid} is no operator of service {broker.service}: "
        f"only root, the supervisor's own user and members of its --admin-group may send "
        f"{', '.join(protocol.ADMIN_OPS)}. Run it as root, or add the operator's user to the --admin-group "
        f"(start the supervisor with --admin-group GROUP if it has none); membership of --group is not enough.",
        see="control-socket-permissions")


def weight(broker: "Broker", caller: Instance, req: protocol.Request) -> dict[str, Any]:
    assert req.standby_weight is not None
    for st in broker.states.values():
        broker.edit_config(st.group, standby_weight=req.standby_weight)
    log.info("standby weight set to %d%% by pid %d", req.standby_weight, caller.pid)
    return {"ok": True, "standby_weight": req.standby_weight}


def _heads_and_slotted(broker: "Broker", role: Role, pid: int | None = None) -> tuple[list[Instance], list[Instance]]:
    """Worker-scope instances hold no slot themselves: their state says whether workers that
    activate later (recycled, added) join drained.  With ``pid``, only that instance and its
    workers (a canary reload drains the old standby while the new one takes its share)."""
    insts = broker.registry.in_role(role)
    if pid is not None:
        insts = [i for i in insts if i.pid == pid or i.parent == pid]
    return [i for i in insts if i.scope is Scope.WORKER], [i for i in insts if i.slots]


def _which(req: protocol.Request) -> str:
    return f"{req.role.value} instance" + (f" with pid {req.pid}" if req.pid is not None else "")  # type: ignore[union-attr]


def drain(broker: "Broker", caller: Instance, req: protocol.Request) -> dict[str, Any]:
    assert req.role is not None
    heads, targets = _heads_and_slotted(broker, req.role, req.pid)
    targets = [i for i in targets if i.state is State.ACTIVE]
    if not targets:
        raise ProtocolError("no_instance", f"no active {_which(req)} to drain")
    for head in heads:
        if head.state is State.ACTIVE:
            head.state = State.DRAINED
    for inst in targets:
        broker.disable(inst, State.DRAINED)
        log.info("%s drained by pid %d", inst.describe(), caller.pid)
    return _result(targets)


def undrain(broker: "Broker", caller: Instance, req: protocol.Request) -> dict[str, Any]:
    assert req.role is not None
    heads, targets = _heads_and_slotted(broker, req.role, req.pid)
    targets = [i for i in targets if i.state.disabled]
    if not targets:
        raise ProtocolError("no_instance", f"no drained {_which(req)} to undrain")
    for head in heads:
        if head.state is State.DRAINED:
            head.state = State.PENDING
    for inst in targets:
        broker.enable(inst)
        log.info("%s undrained by pid %d", inst.describe(), caller.pid)
    return _result(targets)


def _result(targets: list[Instance]) -> dict[str, Any]:
    return {"ok": True, "instances": [{"id": i.id, "pid": i.pid, "state": i.state.value} for i in targets]}


def promote(broker: "Broker", caller: Instance) -> dict[str, Any]:
    """Swap the roles of the running instances: one flag in the program, no socket moves."""
    live = {r: broker.registry.in_role(r, State.ACTIVE) for r in Role}
    if not live[Role.STANDBY]:
        raise ProtocolError("no_instance", "no active standby to promote")
    broker.swapped = not broker.swapped
    for st in broker.states.values():
        broker.edit_config(st.group, flags=FLAG_SWAP_ROLES if broker.swapped else 0)
    for inst in broker.registry:
        if inst.role is not None:
            inst.role = inst.role.other
    log.info("promote by pid %d: instances %s are now primary", caller.pid, [i.id for i in live[Role.STANDBY]])
    return {"ok": True, "swapped": broker.swapped,
            "primary": [i.id for i in live[Role.STANDBY]], "standby": [i.id for i in live[Role.PRIMARY]]}
