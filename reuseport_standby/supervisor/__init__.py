"""The supervisor: the one privileged process; owns the program, the maps and the addresses,
and brokers listeners to instances.

- :mod:`.loop`: the event loop and the peers' connections (:class:`Supervisor`)
- :mod:`.broker`: hello / ready / stop / readopt, slots and parking, health actions
- :mod:`.registry`: instances and workers, their states, per-uid quotas
- :mod:`.slots`, :mod:`.health`: pure decisions (slot arithmetic, hang and recovery)
- :mod:`.commands`: weight, drain, undrain, promote
- :mod:`.handover`: what is done to a hung instance (queue hand-over, signals)
- :mod:`.view`: the ``status`` document
- :mod:`.peers`: who is at the other end (SO_PEERCRED, SO_PEERGROUPS)
- :mod:`.options`: the ``supervise`` command line as one object
"""

from .loop import Supervisor, sd_notify
from .options import MAX_CONNECTIONS_PER_UID, SuperviseOptions
from .view import address_status

__all__ = ["Supervisor", "SuperviseOptions", "MAX_CONNECTIONS_PER_UID", "address_status", "sd_notify"]
