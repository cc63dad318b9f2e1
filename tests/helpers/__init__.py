"""What several test modules share: processes (supervisor, instances), load with fault attribution,
raw sockets, the systemd unit emulation, and the in-memory kernel.  Tests import from here, never
from each other."""
