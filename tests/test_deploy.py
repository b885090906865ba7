"""The deployment files: deploy/Dockerfile, docker-compose.yml and deploy/k8s/.

Static checks always run and need no Docker or Kubernetes: every container command is
parsed by the real ``gradmesh`` argument parser of its role (so a renamed flag fails here,
not in production), with the ``GRADMESH_*`` environment the container gets, and must pass
the server's own start-up check (``runtime.check_config``: e.g. 0.0.0.0 needs TLS or
--insecure). Every probe targets a port the command listens on, every --workers/--shards
address names a service or pod of the right role on the right port, the Kubernetes
workers (a Deployment) register at the coordinator's Service and gRPC port under their
downward-API pod IP, and the Dockerfile's ENTRYPOINT is the console script pyproject.toml
declares.

``test_compose_cluster_trains`` (marked ``docker``) builds the image, starts the compose
cluster and trains through the SDK; it skips where no Docker engine answers.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest

from gradmesh.client.cluster import wait_serving

try:
    import yaml
except ImportError:                                         # pragma: no cover
    raise ImportError("tests/test_deploy.py needs PyYAML: pip install -e '.[test]'") from None

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
SERVER_ROLES = ("worker", "shard", "coordinator")


# ======================================================================== helpers ========

def role_parser(role: str) -> argparse.ArgumentParser:
    """The parser ``gradmesh ROLE`` uses, built as server/cli.py builds it."""
    from gradmesh.server import cli
    assert role in cli.COMMANDS, f"'{role}' is not a gradmesh subcommand ({list(cli.COMMANDS)})"
    module = importlib.import_module(cli.COMMANDS[role][0])
    # No abbreviations: a manifest must spell flags in full, or a new flag sharing the
    # prefix would make it ambiguous.
    parser = argparse.ArgumentParser(prog=f"gradmesh {role}", allow_abbrev=False)
    module.add_arguments(parser)
    return parser


@contextlib.contextmanager
def gradmesh_env(env: dict[str, str]) -> Iterator[None]:
    """Exactly ``env`` as the GRADMESH_* variables (flag defaults are read from them)."""
    with mock.patch.dict(os.environ):
        for key in [k for k in os.environ if k.startswith("GRADMESH_")]:
            del os.environ[key]
        os.environ.update(env)
        yield


def env_var_of(option: str) -> str:
    return "GRADMESH_" + option.lstrip("-").replace("-", "_").upper()


def parse_command(where: str, argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """Parse ``gradmesh *argv`` as the container would run it, and check it would start."""
    from gradmesh.server import runtime
    assert argv, f"{where}: empty command"
    role, rest = argv[0], [str(a) for a in argv[1:]]
    assert role in SERVER_ROLES, f"{where}: '{role}' is not a server role {SERVER_ROLES}"
    with gradmesh_env(env):
        parser = role_parser(role)
        known = {env_var_of(o) for a in parser._actions for o in a.option_strings
                 if o.startswith("--")}
        unknown = sorted(k for k in env if k.startswith("GRADMESH_") and k not in known)
        assert not unknown, f"{where}: {unknown} match no flag of 'gradmesh {role}'"
        try:
            args = parser.parse_args(rest)
        except SystemExit:
            pytest.fail(f"{where}: 'gradmesh {role}' rejects {shlex.join(rest)} "
                        f"(argparse's message is in the captured stderr)")
    try:
        runtime.check_config(runtime.config_from_args(args))
    except runtime.ConfigError as e:
        pytest.fail(f"{where}: 'gradmesh {shlex.join(argv)}' would refuse to start: {e}")
    args.role = role
    return args


def split_addresses(value: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (x.strip() for x in (value or "").split(","))):
        host, _, port = item.rpartition(":")
        assert host and port.isdigit(), f"address {item!r} is not host:port"
        out.append((host, int(port)))
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with every variable unset (the defaults apply)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("gradmesh_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:                             # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs "
                                      "Python 3.11+ or tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ===================================================================== Dockerfile ========

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_the_console_script():
    import json
    instructions = dockerfile_instructions()
    entrypoints = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "one ENTRYPOINT"
    entry = json.loads(entrypoints[0])
    assert entry == ["gradmesh"], f"ENTRYPOINT {entry}: exec form of the console script"
    assert "gradmesh" in pyproject()["project"]["scripts"]


def test_dockerfile_base_user_and_install():
    instructions = dockerfile_instructions()
    assert [rest for word, rest in instructions if word == "FROM"] == ["python:3.11-slim"]
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, \
        f"USER {users[-1]}: numeric and non-zero, so Kubernetes' runAsNonRoot can verify it"
    for manifest_uid in {c["runAsUser"] for c in k8s_security_contexts() if "runAsUser" in c}:
        assert manifest_uid == int(uid), "the manifests' runAsUser is the image's user"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install --no-cache-dir ." in runs
    assert "[test]" not in runs and "pip install -e" not in runs, "a plain install, no test extra"


def test_dockerfile_copies_every_package_source():
    """A package directory added to pyproject.toml but not copied would be missing."""
    copied = set()
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied.update(p.rstrip("/") for p in parts[:-1])
    meta = pyproject()
    needed = {"pyproject.toml", meta["project"]["readme"]}
    needed |= {d.split("/")[0] for d in meta["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    assert "deploy/healthcheck.py" in copied
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for entry in (".venv", ".ci-venv", ".git", "**/__pycache__"):
        assert entry in ignored, f".dockerignore must exclude {entry}"
    clash = sorted(p for p in copied if any(p == i or p.startswith(i + "/") for i in ignored))
    assert not clash, f".dockerignore excludes what the Dockerfile copies: {clash}"


def test_dockerfile_exposes_every_role_port():
    exposed = {int(p.split("/")[0]) for word, rest in dockerfile_instructions()
               if word == "EXPOSE" for p in rest.split()}
    for role in SERVER_ROLES:
        from gradmesh.server import cli
        module = importlib.import_module(cli.COMMANDS[role][0])
        assert module.DEFAULT_PORT in exposed, f"{role}'s port {module.DEFAULT_PORT}"
    metrics = {int(s["environment"]["GRADMESH_METRICS_PORT"])
               for s in compose_services().values() if "GRADMESH_METRICS_PORT" in
               s.get("environment", {})}
    assert metrics <= exposed


# ======================================================================== compose ========

@functools.lru_cache(maxsize=None)
def compose_doc() -> dict:
    with open(COMPOSE_FILE) as f:
        return interpolate(yaml.safe_load(f))


def compose_services() -> dict[str, dict]:
    return compose_doc()["services"]


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@functools.lru_cache(maxsize=None)
def compose_commands() -> dict[str, argparse.Namespace]:
    return {name: parse_command(f"docker-compose.yml: {name}", s["command"], compose_env(s))
            for name, s in compose_services().items()}


def test_compose_commands_parse_and_would_start():
    commands = compose_commands()
    roles = sorted(a.role for a in commands.values())
    assert roles == ["coordinator", "shard", "shard", "worker", "worker"]


def test_compose_services_use_the_one_image():
    for name, service in compose_services().items():
        assert service["build"]["context"] == "."
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == compose_services()["coordinator"]["image"], name


def test_compose_healthchecks_probe_the_served_port():
    parser = load_healthcheck().build_parser()
    for name, args in compose_commands().items():
        test = compose_services()[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "gradmesh-healthcheck", f"{name}: {test}"
        probe = parser.parse_args(test[2:])
        assert probe.port == args.port, f"{name} listens on {args.port}, probed on {probe.port}"


def test_compose_addresses_name_services_of_the_right_role():
    commands = compose_commands()
    coordinators = [a for a in commands.values() if a.role == "coordinator"]
    assert len(coordinators) == 1
    coordinator = coordinators[0]
    for flag, role in (("workers", "worker"), ("shards", "shard")):
        listed = split_addresses(getattr(coordinator, flag))
        for host, port in listed:
            assert host in commands, f"--{flag} names {host!r}, which is no compose service"
            assert commands[host].role == role, f"--{flag} names {host}, a {commands[host].role}"
            assert commands[host].port == port, f"{host} listens on {commands[host].port}"
            assert not getattr(commands[host], "coordinator", None), \
                f"{host} is in --{flag} and also registers itself: it would count twice"
        every = {n for n, a in commands.items() if a.role == role}
        assert {h for h, _ in listed} == every, f"every {role} service is in --{flag}"
    for name, service in compose_services().items():
        for dep in service.get("depends_on") or {}:
            assert dep in commands, f"{name} depends on unknown service {dep!r}"


def test_compose_publishes_only_the_coordinator_on_loopback():
    commands = compose_commands()
    for name, service in compose_services().items():
        ports = service.get("ports") or []
        if commands[name].role != "coordinator":
            assert not ports, f"{name} must not be published on the host"
            continue
        assert len(ports) == 1
        host_ip, host_port, container_port = str(ports[0]).split(":")
        assert host_ip == "127.0.0.1", "published on the host's loopback only"
        assert int(container_port) == commands[name].port and host_port.isdigit()


def test_compose_state_dirs_are_named_volumes():
    doc = compose_doc()
    for name, args in compose_commands().items():
        if args.role == "worker":
            continue
        assert args.state_dir, f"{name}: --state-dir, or its checkpoints die with it"
        mounts = dict(reversed(v.split(":")[:2]) for v in doc["services"][name]["volumes"])
        assert args.state_dir in mounts, f"{name}: nothing mounted at {args.state_dir}"
        assert mounts[args.state_dir] in doc["volumes"], f"{name}: not a named volume"


# ===================================================================== Kubernetes ========

@functools.lru_cache(maxsize=None)
def k8s_objects() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        with open(K8S_DIR / name) as f:
            out.extend((name, doc) for doc in yaml.safe_load_all(f) if doc)
    return out


def k8s_by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for _, o in k8s_objects() if o["kind"] == kind}


def workloads() -> dict[str, dict]:
    return {**k8s_by_kind("StatefulSet"), **k8s_by_kind("Deployment")}


def k8s_security_contexts() -> list[dict]:
    out = []
    for w in workloads().values():
        pod = w["spec"]["template"]["spec"]
        out.append(pod.get("securityContext") or {})
        out.extend(c.get("securityContext") or {} for c in pod["containers"])
    return out


def container_env(where: str, container: dict) -> dict[str, str]:
    """The GRADMESH_* environment of ``container``; Secret values become placeholders."""
    configmaps = k8s_by_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"{where}: ConfigMap {ref!r} is not in the manifests"
        env.update({k: str(v) for k, v in configmaps[ref]["data"].items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            assert "secretKeyRef" in item["valueFrom"] or "fieldRef" in item["valueFrom"]
            env[item["name"]] = "placeholder"
    return env


@functools.lru_cache(maxsize=None)
def k8s_commands() -> dict[str, tuple[dict, dict, argparse.Namespace]]:
    """workload name -> (workload, container, parsed args), for the gradmesh container."""
    out = {}
    for name, w in workloads().items():
        (container,) = w["spec"]["template"]["spec"]["containers"]
        where = f"deploy/k8s: {w['kind']} {name}"
        assert "command" not in container, f"{where}: use the image's ENTRYPOINT (gradmesh)"
        out[name] = (w, container, parse_command(where, container["args"],
                                                 container_env(where, container)))
    return out


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_manifests_are_namespace_agnostic():
    for file, o in k8s_objects():
        assert "namespace" not in o["metadata"], f"{file}: {o['kind']} names a namespace"


def test_k8s_commands_parse_and_would_start():
    roles = sorted(args.role for _, _, args in k8s_commands().values())
    assert roles == ["coordinator", "shard", "worker"]


def test_k8s_token_comes_from_a_secret():
    for name, (_, container, _) in k8s_commands().items():
        token = [e for e in container.get("env") or [] if e["name"] == "GRADMESH_TOKEN"]
        assert token and "secretKeyRef" in token[0]["valueFrom"], \
            f"{name}: GRADMESH_TOKEN from a Secret"
        for cm in k8s_by_kind("ConfigMap").values():
            assert "GRADMESH_TOKEN" not in cm.get("data", {}), "no token in a ConfigMap"


def test_k8s_probes_resources_and_security():
    for name, (w, container, args) in k8s_commands().items():
        pod = w["spec"]["template"]["spec"]
        assert (pod.get("securityContext") or {}).get("runAsNonRoot") is True, name
        sc = container.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, name
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{name}: no {probe}"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] == args.port, \
                    f"{name}: {probe} probes {container[probe]['grpc']['port']}, " \
                    f"the server listens on {args.port}"
        ports = {p["containerPort"] for p in container["ports"]}
        assert args.port in ports, f"{name}: containerPort {args.port} not declared"
        if args.metrics_port:
            assert args.metrics_port in ports, f"{name}: metrics port not declared"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"


def test_k8s_state_dirs_are_persistent_volumes():
    for name, (w, container, args) in k8s_commands().items():
        if args.role == "worker":
            continue
        assert w["kind"] == "StatefulSet", f"{name}: a {args.role} keeps state"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        assert args.state_dir in mounts, f"{name}: nothing mounted at --state-dir"
        assert mounts[args.state_dir] in claims, f"{name}: --state-dir is not on a PVC"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_select_their_pods():
    services = k8s_by_kind("Service")
    commands = k8s_commands()
    for name, (w, container, _) in commands.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert _matches(w["spec"]["selector"]["matchLabels"], labels), name
        if w["kind"] == "StatefulSet":
            svc = services.get(w["spec"]["serviceName"])
            assert svc is not None, f"{name}: serviceName {w['spec']['serviceName']!r} missing"
            assert svc["spec"].get("clusterIP") == "None", f"{name}: its Service is headless"
    for name, svc in services.items():
        selected = [c for w, c, _ in commands.values()
                    if _matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]
                                ["labels"])]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        port_names = {p.get("name") for p in selected[0]["ports"]}
        port_numbers = {p["containerPort"] for p in selected[0]["ports"]}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in port_names | port_numbers, f"Service {name}: {target} unknown"


def test_k8s_coordinator_addresses_name_pods_of_the_right_role():
    """--shards (and --workers, were it given) name pods of StatefulSets of that role."""
    commands = k8s_commands()
    (coordinator,) = [a for _, _, a in commands.values() if a.role == "coordinator"]
    by_service = {w["spec"]["serviceName"]: (name, w, args)
                  for name, (w, _, args) in commands.items() if w["kind"] == "StatefulSet"}
    for flag, role in (("workers", "worker"), ("shards", "shard")):
        listed = split_addresses(getattr(coordinator, flag))
        for host, port in listed:
            pod, _, service = host.partition(".")
            assert service in by_service, f"--{flag} {host}: no headless Service {service!r}"
            name, w, args = by_service[service]
            index = pod.removeprefix(name + "-")
            assert index.isdigit() and int(index) < w["spec"]["replicas"], \
                f"--{flag} {host}: not a pod of StatefulSet {name}"
            assert args.role == role and args.port == port, f"--{flag} {host}:{port}"
        targets = [n for n, (w, _, a) in commands.items()
                   if a.role == role and not (role == "worker" and a.coordinator)]
        for name in targets:
            assert commands[name][0]["kind"] == "StatefulSet", \
                f"{name}: a {role} the coordinator must name needs stable pod names"
            assert len([h for h, _ in listed if h.startswith(name + "-")]) == \
                commands[name][0]["spec"]["replicas"], \
                f"--{flag} must list every replica of {name} (and only those)"


_K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def test_k8s_arg_references_are_defined_in_env():
    """Kubernetes expands $(VAR) in args only for variables in the container's `env`; an
    undefined one stays the literal text "$(VAR)"."""
    for name, (_, container, _) in k8s_commands().items():
        defined = {e["name"] for e in container.get("env") or []}
        for arg in container["args"]:
            for var in _K8S_REF.findall(str(arg)):
                assert var in defined, f"{name}: args use $({var}), which `env` does not define"


def coordinator_addresses() -> tuple[set[tuple[str, int]], argparse.Namespace]:
    """Every host:port by which pods in the namespace reach the coordinator's gRPC port."""
    commands = k8s_commands()
    (name,) = [n for n, (_, _, a) in commands.items() if a.role == "coordinator"]
    w, container, args = commands[name]
    labels = w["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    out = set()
    for svc_name, svc in k8s_by_kind("Service").items():
        if not _matches(svc["spec"]["selector"], labels):
            continue
        headless = svc["spec"].get("clusterIP") == "None"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            target = named.get(target, target)
            # A headless Service's name resolves to the pod IPs: its ports do not remap.
            port = target if headless else p["port"]
            if target == args.port:
                out.add((svc_name, port))
                if headless and w["kind"] == "StatefulSet" and \
                        w["spec"]["serviceName"] == svc_name:
                    out |= {(f"{name}-{i}.{svc_name}", port)
                            for i in range(w["spec"]["replicas"])}
    return out, args


def test_k8s_workers_register_with_the_coordinator():
    """Workers are a Deployment that registers itself: --coordinator names the
    coordinator's Service (or pod) and gRPC port, --advertise the pod's own IP."""
    commands = k8s_commands()
    targets, coordinator = coordinator_addresses()
    assert targets, "no Service reaches the coordinator's gRPC port"
    assert not split_addresses(coordinator.workers), \
        "the workers register themselves: a --workers list would name each one twice"
    workers = {n: c for n, c in commands.items() if c[2].role == "worker"}
    assert workers
    for name, (w, container, args) in workers.items():
        assert w["kind"] == "Deployment", f"{name}: stateless and scalable, a Deployment"
        assert args.coordinator, f"{name}: no --coordinator to register with"
        (target,) = split_addresses(args.coordinator)
        assert target in targets, \
            f"{name}: --coordinator {args.coordinator} is none of {sorted(targets)}"
        assert args.advertise, f"{name}: without --advertise it would offer 0.0.0.0"
        host, _, port = args.advertise.rpartition(":")
        assert port.isdigit() and int(port) == args.port, \
            f"{name}: --advertise {args.advertise}, but the worker listens on {args.port}"
        var = _K8S_REF.fullmatch(host)
        assert var, f"{name}: --advertise host {host!r} is not $(VAR) of the pod's IP"
        env = {e["name"]: e for e in container.get("env") or []}
        assert var.group(1) in env, f"{name}: $({var.group(1)}) is not defined in `env`"
        field = env[var.group(1)].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field == "status.podIP", \
            f"{name}: {var.group(1)} must come from the downward API's status.podIP"


def test_k8s_disruption_budget_and_network_policies_select_pods():
    commands = k8s_commands()
    pod_labels = {n: w["spec"]["template"]["metadata"]["labels"]
                  for n, (w, _, _) in commands.items()}
    (pdb,) = k8s_by_kind("PodDisruptionBudget").values()
    chosen = [n for n, labels in pod_labels.items()
              if _matches(pdb["spec"]["selector"]["matchLabels"], labels)]
    assert [commands[n][2].role for n in chosen] == ["worker"]
    for name, policy in k8s_by_kind("NetworkPolicy").items():
        chosen = [n for n, labels in pod_labels.items()
                  if _matches(policy["spec"]["podSelector"]["matchLabels"], labels)]
        assert len(chosen) == 1, f"NetworkPolicy {name} selects {chosen}"
        args = commands[chosen[0]][2]
        allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert args.port in allowed, f"NetworkPolicy {name} blocks the gRPC port"
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                assert any(_matches(peer["podSelector"]["matchLabels"], labels)
                           for labels in pod_labels.values()), f"{name}: peer selects nothing"


def test_k8s_images_are_the_kustomized_image():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    names = {i["name"] for i in kustomization["images"]}
    for name, (_, container, _) in k8s_commands().items():
        assert container["image"].split(":")[0] in names, f"{name}: {container['image']}"


# =================================================================== health probe ========

def test_healthcheck_script_against_a_real_server(worker, free_port):
    probe = load_healthcheck()
    assert probe.main([str(worker.port), "--timeout", "5"]) == 0
    assert probe.main([str(free_port()), "--timeout", "0.5"]) == 1


# ========================================================== the compose cluster =========

def _docker_or_skip() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH")
    try:
        import docker
        docker.from_env(timeout=3).ping()
    except Exception as e:  # noqa: BLE001  (any failure means: no engine to test with)
        pytest.skip(f"no Docker engine answers ({type(e).__name__}: {e})")
    try:
        version = subprocess.run(["docker", "compose", "version"], capture_output=True,
                                 timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip("'docker compose version' hangs")
    if version.returncode != 0:
        pytest.skip("the docker compose plugin (v2) is not installed")


@pytest.mark.docker
@pytest.mark.slow
def test_compose_cluster_trains(monkeypatch, free_port):
    """Build the image, start the compose cluster, train through the SDK, restart the
    coordinator and find the job where it was (its state volume)."""
    _docker_or_skip()
    import numpy as np
    from testcontainers.compose import DockerCompose

    import gradmesh.core as gm
    import gradmesh.core.nn.functional as F
    from gradmesh.client import Unauthenticated
    from gradmesh.client.coordinator import CoordinatorClient

    port, token = free_port(), "compose-test-token"
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"gradmesh-test-{os.getpid()}")
    monkeypatch.setenv("GRADMESH_COMPOSE_PORT", str(port))
    monkeypatch.setenv("GRADMESH_TOKEN", token)
    monkeypatch.setenv("GRADMESH_IMAGE", "gradmesh:compose-test")
    target = f"127.0.0.1:{port}"

    gm.manual_seed(0)
    model = gm.nn.Sequential(gm.nn.Linear(8, 16), gm.nn.Tanh(), gm.nn.Linear(16, 3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)

    def loss_fn(m, xb, yb):
        return F.cross_entropy(m(xb), yb)

    compose = DockerCompose(ROOT, compose_file_name="docker-compose.yml", build=True,
                            wait=True)
    with compose:
        try:
            wait_serving(target, timeout=60)
            with CoordinatorClient(target, timeout=120, retry_seconds=60) as anonymous:
                with pytest.raises(Unauthenticated):
                    anonymous.list_workers()
            with CoordinatorClient(target, token=token, timeout=120,
                                   retry_seconds=60) as client:
                job = client.create_job(model, loss_fn, {"name": "sgd", "lr": 0.5},
                                        micro_batch_size=16, example_batch=(x[:16], y[:16]))
                losses = [job.step(x, y).loss for _ in range(5)]
                ready = {w.address for w in client.list_workers() if w.state == "ready"}
            assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
            assert ready == {"worker-1:50051", "worker-2:50051"}

            compose._run_command(cmd=[*compose.compose_command_property, "restart",
                                      "coordinator"])
            wait_serving(target, timeout=60)
            with CoordinatorClient(target, token=token, timeout=120,
                                   retry_seconds=60) as client:
                resumed = client.job(job.job_id)
                assert resumed.status().version == 5
                assert np.isfinite(resumed.step(x, y).loss)
                assert resumed.status().version == 6
        except BaseException:
            with contextlib.suppress(Exception):     # the logs explain most failures
                stdout, stderr = compose.get_logs()
                print(stdout[-20000:], stderr[-5000:], sep="\n", file=sys.stderr)
            raise
