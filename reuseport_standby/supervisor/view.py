"""What ``status`` shows: the broker's registry joined with what the maps and sock_diag say.

``address_status`` is shared with the offline status, which reads the pins
while no supervisor runs.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ..kernel import diag
from ..kernel.layout import PARKING_SLOT, Role
from ..kernel.sockets import Address, socket_cookie

if TYPE_CHECKING:
    from .broker import Broker, GroupMaps


def status(broker: "Broker") -> dict[str, Any]:
    queues = broker.queues()
    now = time.monotonic()
    return {
        "service": broker.service,
        "supervisor": {"pid": os.getpid(), "uptime_s": round(time.time() - broker.started_at, 1), **broker.about,
                       "stall_timeout_s": broker.stall_timeout, "on_hang": broker.on_hang,
                       "demotions": broker.demotions_total},
        "roles_swapped": broker.swapped,
        "addresses": [{**address_status(st.address, st.group, queues, parking=socket_cookie(st.anchor),
                                        owners=broker.registry.owners(st.address)),
                       "program_integrity": st.watch.as_dict()} for st in broker.states.values()],
        "instances": [
            {"id": i.id, "role": i.role.value if i.role else None, "pid": i.pid, "uid": i.uid, "name": i.name,
             "state": i.state.value, "since": round(i.since, 3), "scope": i.scope.value, "parent": i.parent,
             "parent_checked": i.parent_checked,
             "slots": {str(a): s for a, s in i.slots.items()},
             "queues": {str(a): queue_dict(queues.get(c)) for a, c in i.cookies.items()},
             "heartbeat_age_s": round(now - i.last_heartbeat, 2) if i.heartbeat else None,
             "demotions": i.demotions, "demoted_for": i.demoted_for or None,
             "version": i.version, "outcomes": (o := i.outcomes).to_wire(), "requests": o.summary()}
            for i in broker.registry.registered()
        ],
    }


def address_status(address: Address, group: "GroupMaps", queues: dict[int, diag.ListenerQueue], *,
                   parking: int | None = None, owners: dict[int, int] | None = None) -> dict[str, Any]:
    """What one group's maps and the kernel's queues say; shared by live and offline status."""
    owners = owners or {}
    slots = group.slots()
    cfg = group.read_config()
    park_cookie = slots.get(PARKING_SLOT, parking)
    swapped = cfg.swapped
    hits = group.slot_hits(sorted(slots))

    def role_of(i: int) -> str:
        return "primary" if (i >= Role.STANDBY.slot_range[0]) == swapped else "standby"

    prog_fd = getattr(group, "prog_fd", -1)
    return {
        "address": str(address),
        "mode": "select_or_migrate" if group.migrate else "select",
        "prog_id": group.prog_info.id if prog_fd >= 0 else None,  # type: ignore[attr-defined]
        "standby_weight": cfg.standby_weight,
        "roles_swapped": swapped,
        "live": {"range0": list(cfg.live[0]), "range1": list(cfg.live[1])},
        "parking": {"slotted": PARKING_SLOT in slots, **queue_dict(queues.get(park_cookie) if park_cookie else None)},
        "slots": [
            {"slot": i, "role": role_of(i), "cookie": c, "instance": owners.get(c),
             "disabled": bool(cfg.disabled >> i & 1), "connections": hits.get(i, 0), **queue_dict(queues.get(c))}
            for i, c in sorted(slots.items()) if i != PARKING_SLOT
        ],
        "counters": group.counters().as_dict(),  # type: ignore[attr-defined]
    }


def queue_dict(q: diag.ListenerQueue | None) -> dict[str, Any]:
    return {"queued": q.queued, "backlog": q.backlog} if q else {"queued": None, "backlog": None}
