"""A primary and a standby instance of one web app sharing one port.

An eBPF SO_REUSEPORT program, loaded as SELECT_OR_MIGRATE, sends every new
connection to the primary while it listens and to the standby the moment it
does not, and moves what was queued on a closing listener instead of
resetting it.
"""

__version__ = "0.1.0"
