"""examples/compose/compose.yaml is the pod of examples/kubernetes/pod.yaml, for Docker/Podman Compose.

No container engine runs on the build machine (docs/deployment.md, "Containers"), so the file is
checked, not run: parsed with PyYAML and held to the pod's facts -- the same commands, environment,
users, capabilities and probes -- plus what Compose needs that Kubernetes gives for free: one holder
of the shared namespaces (Kubernetes' pause container), since a PID namespace dies with its first
process and the supervisor's restart must not take the instances with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "examples" / "compose" / "compose.yaml"
POD = REPO / "examples" / "kubernetes" / "pod.yaml"
CONTAINERFILE = REPO / "examples" / "kubernetes" / "Containerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def pod() -> dict:
    return yaml.safe_load(POD.read_text())


def _containers(pod: dict) -> dict[str, dict]:
    spec = pod["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _mount(service: dict, target: str) -> dict | None:
    """The volume of ``service`` mounted at ``target``, in the long form."""
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, _, rest = v.partition(":")
            v = {"type": "volume" if not source.startswith(("/", ".")) else "bind", "source": source,
                 "target": rest.split(":")[0]}
        if v["target"] == target:
            return v
    return None


def test_services_are_the_pods_containers_and_a_namespace_holder(compose: dict, pod: dict) -> None:
    services = compose["services"]
    assert set(services) == {"pod", "supervisor", "primary", "standby"}
    assert {"supervisor", "primary", "standby"} <= set(_containers(pod))
    for name in ("supervisor", "primary", "standby"):
        assert services[name]["network_mode"] == "service:pod", name  # one port, one network namespace
        assert services[name]["pid"] == "service:pod", name  # pod.yaml: shareProcessNamespace
    assert pod["spec"]["shareProcessNamespace"] is True
    holder = services["pod"]
    assert holder["command"] == ["sleep", "infinity"] and holder["init"] is True
    assert "cap_add" not in holder and holder["cap_drop"] == ["ALL"]


def test_same_commands_environment_and_image(compose: dict, pod: dict) -> None:
    services, containers = compose["services"], _containers(pod)
    for name in ("supervisor", "primary", "standby"):
        assert services[name]["command"] == containers[name]["command"], name
        assert services[name]["image"] == containers[name]["image"], name
        want = {k: v for k, v in _env(containers[name]).items()}
        assert services[name].get("environment", {}) == want, name
    assert services["pod"]["image"] == containers["supervisor"]["image"]


def test_same_users_and_capabilities(compose: dict, pod: dict) -> None:
    services, containers = compose["services"], _containers(pod)
    sup_ctx = containers["supervisor"]["securityContext"]
    sup = services["supervisor"]
    assert sup["user"] == str(sup_ctx["runAsUser"]) == "0"
    assert sup["cap_drop"] == sup_ctx["capabilities"]["drop"] == ["ALL"]
    assert sup["cap_add"] == sup_ctx["capabilities"]["add"] == ["BPF"]
    fs_group = pod["spec"]["securityContext"]["fsGroup"]
    assert sup["group_add"] == [str(fs_group)]  # the supervisor may hand its socket only to a group it is in
    assert f"--group {fs_group}" in " ".join(sup["command"])
    for name in ("primary", "standby"):
        ctx, svc = containers[name]["securityContext"], services[name]
        assert svc["user"] == f"{ctx['runAsUser']}:{ctx['runAsGroup']}", name
        assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc, name
    image_user = re.search(r"^USER (\S+)", CONTAINERFILE.read_text(), re.M)
    assert image_user and image_user.group(1) == services["primary"]["user"]
    for name, svc in services.items():
        assert not svc.get("privileged"), name
        assert svc["read_only"] is True and "no-new-privileges:true" in svc["security_opt"], name


def test_shared_control_volume_and_the_pins(compose: dict, pod: dict) -> None:
    services, containers = compose["services"], _containers(pod)
    control_path = next(m["mountPath"] for m in containers["supervisor"]["volumeMounts"] if m["name"] == "control")
    for name in ("supervisor", "primary", "standby"):
        mount = _mount(services[name], control_path)
        assert mount is not None and mount["type"] == "volume" and mount["source"] == "control", name
    assert "control" in compose["volumes"]
    command = services["supervisor"]["command"]
    pin_root = command[command.index("--pin-root") + 1]
    pins = _mount(services["supervisor"], pin_root)
    assert pins is not None and pins["type"] == "bind" and pins["source"].startswith("/sys/fs/bpf/"), pins
    assert not pin_root.startswith("/sys/")  # AppArmor's default profiles deny writes below /sys/fs
    for name in ("primary", "standby", "pod"):
        assert _mount(services[name], pin_root) is None, f"{name} must not see the pins"


def test_port_published_once_by_the_namespace_holder(compose: dict, pod: dict) -> None:
    services, containers = compose["services"], _containers(pod)
    command = services["supervisor"]["command"]
    bind_port = command[command.index("--bind") + 1].rsplit(":", 1)[1]
    container_port = containers["supervisor"]["ports"][0]["containerPort"]
    assert services["pod"]["ports"] == [f"{container_port}:{container_port}"] and str(container_port) == bind_port
    assert all("ports" not in services[n] for n in ("supervisor", "primary", "standby"))


def test_probes_and_stop_timeouts_match_the_pod(compose: dict, pod: dict) -> None:
    services, containers = compose["services"], _containers(pod)
    assert services["supervisor"]["healthcheck"]["test"][1:] == containers["supervisor"]["startupProbe"]["exec"]["command"]
    for name in ("primary", "standby"):
        svc = services[name]
        assert svc["healthcheck"]["test"][1:] == containers[name]["livenessProbe"]["exec"]["command"], name
        assert svc["depends_on"]["supervisor"]["condition"] == "service_healthy", name  # pod: startupProbe gate
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace >= pod["spec"]["terminationGracePeriodSeconds"], name
