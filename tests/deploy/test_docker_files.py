"""The Docker image and compose stack, checked by reading them (Docker does not run here, so
the images are not built by the tests): what goes into the build context, where secrets come
from, pinned images, start-up order, the deploy job, the landing mount and a loopback-only UI."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
#: A ${NAME}, ${NAME:-default} or ${NAME:?message} reference of compose's interpolation.
REFERENCE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def build_context_admits(path: str) -> bool:
    """Whether ``.dockerignore`` lets ``path`` into the build context (its last matching rule wins)."""
    import fnmatch

    admitted = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "**" or any(fnmatch.fnmatch(candidate, pattern.replace("**/", "*")) for candidate in _prefixes(path)):
            admitted = negated
    return admitted


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_the_build_context_holds_the_project_and_nothing_heavy_or_secret() -> None:
    for needed in ("pyproject.toml", "constraints.txt", "prefect.yaml", "shiftcost/config.py", "flows/watch.py", "tasks/intake.py", "migrations/env.py"):
        assert build_context_admits(needed), needed
    for kept_out in (".venv/bin/python", ".git/HEAD", "docker/.env", "landing/batch.npz", "shiftcost.db", "shiftcost-artifacts/x.pt", "tests/conftest.py", "flows/__pycache__/watch.cpython-311.pyc"):
        assert not build_context_admits(kept_out), kept_out
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    for sources in copied:
        for source in sources.split():
            assert source != "." and build_context_admits(source), f"COPY {source} is not in the build context"


def test_images_are_pinned_by_version(services: dict) -> None:
    bases = re.findall(r"^FROM\s+(\S+)", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    external = [service["image"] for service in services.values() if "build" not in service]
    assert bases and external
    for image in bases + external:
        name, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+(\.\d+)?", tag), f"{image} is not pinned to a version"
    # The server runs the project's own image: the upstream Prefect image does not pin FastAPI below 0.151.
    assert "build" in services["prefect-server"]


def test_secrets_come_from_an_uncommitted_env_file_of_which_an_example_is_committed(compose: dict) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    example = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines() if line and not line.startswith("#"))
    required = {name for name, kind, _ in REFERENCE.findall(text) if kind == "?"}
    assert "POSTGRES_PASSWORD" in required and required <= set(example)
    # No password is written into the compose file: every one is a reference to the env file.
    assert not re.search(r"^\s*\w*(PASSWORD|SECRET|KEY)\w*:\s*(?!\$\{)\S", text, flags=re.M)
    for url in re.findall(r"postgresql\+\w+://\S+", text):
        assert re.match(r"postgresql\+\w+://\w+:\$\{POSTGRES_PASSWORD", url), url
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"


def test_the_stack_starts_in_order_and_a_one_shot_job_deploys_the_flows(services: dict) -> None:
    migrate_users = [name for name, service in services.items() if "migrate" in service.get("depends_on", {})]
    assert {"worker-cpu", "worker-gpu", "deploy-flows"} <= set(migrate_users)
    for name in migrate_users:
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    assert services["migrate"]["command"] == ["db", "upgrade"] and services["migrate"]["restart"] == "no"
    job = services["deploy-flows"]
    script = " ".join(job["command"])
    assert "prefect --no-prompt deploy --all" in script and job["restart"] == "no"
    assert "work-pool create cpu" in script and "work-pool create gpu" in script
    assert job["depends_on"]["prefect-server"] == {"condition": "service_healthy"}
    assert "healthcheck" in services["prefect-server"]
    for worker in ("worker-cpu", "worker-gpu"):
        assert services[worker]["depends_on"]["deploy-flows"] == {"condition": "service_completed_successfully"}
        pool = services[worker]["entrypoint"][services[worker]["entrypoint"].index("--pool") + 1]
        assert pool == worker.removeprefix("worker-")


def test_the_workers_stop_gracefully_and_compose_waits_for_them(services: dict) -> None:
    from typer.main import get_command

    from shiftcost.cli import app

    (grace,) = [param.default for param in get_command(app).commands["worker"].params if param.name == "grace_period"]
    for worker in ("worker-cpu", "worker-gpu"):
        assert services[worker]["entrypoint"][:2] == ["shiftcost", "worker"], worker
        # Both waits of the worker (runs ending, then recording their interruption) and a margin.
        stop = re.fullmatch(r"(\d+)s", services[worker]["stop_grace_period"])
        assert stop is not None and int(stop.group(1)) > 2 * grace, (worker, services[worker]["stop_grace_period"], grace)


def test_the_landing_area_is_a_documented_bind_mount_where_the_workers_look(services: dict) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for worker in ("worker-cpu", "worker-gpu"):
        environment = services[worker]["environment"]
        (mount,) = [volume for volume in services[worker]["volumes"] if isinstance(volume, dict) and volume["target"] == environment["SHIFTCOST_LANDING"]]
        assert mount["type"] == "bind" and "SHIFTCOST_LANDING_DIR" in mount["source"]
    assert "SHIFTCOST_LANDING_DIR" in (DOCKER / "env.example").read_text()
    assert re.search(r"^#.*Landing area.*SHIFTCOST_LANDING_DIR", text, flags=re.M | re.S)
    assert "SHIFTCOST_LANDING_DIR" in (ROOT / "README.md").read_text()


def test_the_prefect_ui_is_published_on_loopback_only_by_default(services: dict) -> None:
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published
    for port in published:
        host = REFERENCE.sub(lambda match: match.group(3) if match.group(2) == "-" else "", str(port)).rsplit(":", 2)[0]
        assert host == "127.0.0.1", f"{port} is published on {host or 'every interface'}"


def test_the_image_runs_the_deployments_from_its_project_folder() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY pyproject.toml constraints.txt README.md prefect.yaml ./" in dockerfile
    assert "pip install -c constraints.txt ." in dockerfile
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert pull == [{"flows.deployments.enter_project_directory": {}}]


def _deploy_job(services: dict, model_dir: Path, bin_dir: Path) -> tuple[str, dict[str, str]]:
    """The deploy job's script with the model mount at ``model_dir`` and compose's ``$$`` escapes
    resolved, and an environment whose ``prefect`` and ``shiftcost`` are stubs that log their arguments."""
    import os

    job = services["deploy-flows"]
    (mount,) = [volume for volume in job["volumes"] if isinstance(volume, dict) and volume["target"] == "/data/model"]
    script = " ".join(job["command"]).replace("$$", "$").replace(mount["target"], str(model_dir))
    for name in ("prefect", "shiftcost"):
        stub = bin_dir / name
        # `shiftcost model show` answers as the database would: 0 when the name has a current version.
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n[ "$1 $2" != "model show" ] || exit "$SHOW_EXIT"\n')
        stub.chmod(0o755)
    return script, os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(bin_dir / "calls"), "SHIFTCOST_MODEL_NAME": "m"}


def test_the_deploy_job_registers_the_mounted_model_once(services: dict, tmp_path: Path) -> None:
    job = services["deploy-flows"]
    (mount,) = [volume for volume in job["volumes"] if isinstance(volume, dict) and volume["target"] == "/data/model"]
    assert mount["type"] == "bind" and "SHIFTCOST_MODEL_DIR" in mount["source"] and mount["read_only"]
    assert "artifacts:/data/artifacts" in job["volumes"]  # the weights it registers are where the workers read them
    assert "SHIFTCOST_MODEL_DIR" in (DOCKER / "env.example").read_text()
    model_dir, bin_dir = tmp_path / "model", tmp_path / "bin"
    bin_dir.mkdir()
    script, env = _deploy_job(services, model_dir, bin_dir)

    def calls(show_exit: int) -> list[str]:
        (bin_dir / "calls").unlink(missing_ok=True)
        done = subprocess.run(["sh", "-c", script], env=env | {"SHOW_EXIT": str(show_exit)}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in (bin_dir / "calls").read_text().splitlines() if line.startswith("shiftcost model register")]

    assert calls(show_exit=2) == []  # no model file mounted: the flows are deployed, nothing registered
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    assert calls(show_exit=2) == [f"shiftcost model register -m {model_dir}/model.safetensors -r {model_dir}/reference"]
    (model_dir / "calibration").mkdir()
    (model_dir / "calibration" / "costmodel.json").write_text("{}")
    (registered,) = calls(show_exit=2)
    assert registered.endswith(f"--cost-model {model_dir}/calibration/costmodel.json")
    assert calls(show_exit=0) == []  # the name has a current version: a restarted stack does not register it again
    # Every option the job passes is one `shiftcost model register` has.
    from typer.testing import CliRunner

    from shiftcost.cli import app

    help_text = CliRunner().invoke(app, ["model", "register", "--help"]).stdout
    for option in re.findall(r"(?:^|\s)(--?[\w-]+)", registered.removeprefix("shiftcost model register")):
        assert option in help_text, option
