"""The kernel edge: the BPF program's map layout, libbpf through ctypes, the two loaders,
sock_diag, pidfd and the listening sockets.  Nothing here knows about instances."""
