"""The control-protocol parser under generated input (no kernel needed), and the
live supervisor under a bounded stream of random messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reuseport_standby import protocol
from reuseport_standby.errors import ProtocolError
from reuseport_standby.kernel.layout import Role

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
keys = st.sampled_from(["v", "op", "role", "pid", "active", "name", "extra"])
ops = st.sampled_from([*protocol.OPS, "dance", "", "HELLO"])
roles = st.sampled_from(["primary", "standby", "leader", "", "PRIMARY"]) | json_values
messages = st.fixed_dictionaries(
    {},
    optional={"v": st.sampled_from([1, 0, 2, True, "1", None]), "op": ops, "role": roles,
              "pid": st.integers(-5, 2**32) | json_values, "active": st.booleans() | json_values,
              "name": st.text(max_size=200) | json_values},
) | st.dictionaries(keys, json_values, max_size=6)


def _check(raw: bytes, nfds: int) -> None:
    try:
        req = protocol.parse_request(raw, nfds)
    except ProtocolError as exc:
        assert exc.code and str(exc)
        return
    # Whatever is accepted is well-formed.
    assert req.op in protocol.OPS
    if req.op in ("hello", "readopt"):
        assert isinstance(req.role, Role) and isinstance(req.pid, int) and req.pid > 0
    assert (req.nfds > 0) == (req.op == "readopt")


@settings(max_examples=6000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=512), nfds=st.integers(0, 3))
def test_parser_survives_arbitrary_bytes(raw: bytes, nfds: int) -> None:
    _check(raw, nfds)


@settings(max_examples=6000, deadline=None, suppress_health_check=list(HealthCheck))
@given(msg=messages, nfds=st.integers(0, 3))
def test_parser_survives_structured_messages(msg: dict, nfds: int) -> None:
    _check(json.dumps(msg).encode(), nfds)


def test_valid_messages_parse() -> None:
    req = protocol.parse_request(json.dumps({"v": 1, "op": "hello", "role": "standby", "pid": 42}).encode())
    assert (req.op, req.role, req.pid) == ("hello", Role.STANDBY, 42)
    req = protocol.parse_request(json.dumps({"v": 1, "op": "readopt", "role": "primary", "pid": 7, "active": True}).encode(), 2)
    assert req.active and req.nfds == 2


def test_live_supervisor_survives_random_messages(control_plane) -> None:
    """A bounded stream of generated messages at a real supervisor: it answers each, and keeps serving."""
    import socket

    from reuseport_standby.client import InstanceClient, connect

    sup = control_plane()
    keeper = InstanceClient("primary", sup.service, control=sup.control)
    for s in keeper.open():
        s.close()
    keeper.ready()
    before = [a["slots"] for a in sup.status()["addresses"]]

    sent = 0

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=256) | messages.map(lambda m: json.dumps(m).encode()))
    def fire(raw: bytes) -> None:
        nonlocal sent
        with connect(sup.control) as c:
            c.sendmsg([raw or b" "])
            c.settimeout(5)
            data, fds, _ = protocol.recv(c)
            for fd in fds:
                socket.socket(fileno=fd).close()
            assert data, "every message gets a reply"
            json.loads(data)
            sent += 1

    fire()
    assert sent >= 100
    assert sup.proc.poll() is None
    assert [a["slots"] for a in sup.status()["addresses"]] == before
    keeper.close()


def test_layout_matches_c_header() -> None:
    """reuseport_standby/layout.py mirrors bpf/standby.h."""
    from reuseport_standby.kernel import layout

    header = (Path(__file__).parent.parent / "bpf" / "standby.h").read_text()
    defs = dict(re.findall(r"#define (RS_\w+) (\d+)", header))
    assert int(defs["RS_LAYOUT_VERSION"]) == layout.LAYOUT_VERSION
    assert int(defs["RS_SLOTS_PER_ROLE"]) == layout.SLOTS_PER_ROLE
    assert int(defs["RS_NR_COUNTERS"]) == layout.NR_COUNTERS
    for c in layout.Counter:
        assert int(defs[f"RS_CNT_{c.name}"]) == c.value, c
    assert int(defs["RS_ROLE_PRIMARY"]) == Role.PRIMARY.number and int(defs["RS_ROLE_STANDBY"]) == Role.STANDBY.number
    fields = re.search(r"struct rs_config \{(.*?)\};", header, re.S).group(1)
    names = re.findall(r"__u(?:8|32|64) (\w+)(?:\[\w+\])*(?: __attribute__\(\(aligned\(8\)\)\))?;", fields)
    assert names == ["live_count", "standby_weight", "layout_version", "disabled", "flags", "reserved", "live"]
    assert layout.CONFIG_SIZE == 32 + 2 * layout.SLOTS_PER_ROLE
    assert int(defs["RS_FLAG_SWAP_ROLES"]) == layout.FLAG_SWAP_ROLES
