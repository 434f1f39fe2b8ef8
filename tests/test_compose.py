"""docker-compose.yml and the Dockerfile, checked structurally (no Docker engine here).

The same topology — a `dask scheduler`, `dask worker tcp://…` processes, a client —
runs for real, as processes, in test_scale_out.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def _argv(service):
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _option(argv, name):
    """Value of ``--name VALUE`` or ``--name=VALUE`` in argv, else None."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_three_services_all_built_from_the_project_image(services):
    assert set(services) == {"scheduler", "worker", "notebook"}
    for name, svc in services.items():
        assert svc.get("build") in (".", {"context": "."}), f"{name} is not built from ./Dockerfile"


def test_scheduler_command_and_ports(services):
    argv = _argv(services["scheduler"])
    assert argv[:2] == ["dask", "scheduler"]
    assert _option(argv, "--port") == "8786"
    assert _option(argv, "--dashboard-address").endswith(":8787")
    published = {p.rsplit(":", 1)[1]: p for p in services["scheduler"]["ports"]}
    assert set(published) == {"8786", "8787"}


def test_worker_command_threads_memory_and_scalable(services):
    worker = services["worker"]
    argv = _argv(worker)
    assert argv[:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert _option(argv, "--nthreads") is not None
    assert _option(argv, "--memory-limit") is not None
    # `docker compose up --scale worker=N` needs no fixed container name and no host port.
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker.get("depends_on") and "scheduler" in worker["depends_on"]


def test_notebook_runs_jupyterlab_with_a_token_and_the_notebooks(services):
    nb = services["notebook"]
    argv = _argv(nb)
    assert argv[:2] == ["jupyter", "lab"]
    assert _option(argv, "--port") == "8888"
    token = _option(argv, "--IdentityProvider.token") or _option(argv, "--ServerApp.token")
    # The token comes from the environment and must be given: an empty token would open
    # the server (and a shell) to anyone who reaches the port.
    assert token and re.fullmatch(r"\$\{JUPYTER_TOKEN:\?[^}]+\}", token), token
    root = _option(argv, "--ServerApp.root_dir")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nb["volumes"]}
    assert mounts.get(root) == "./notebooks"
    assert nb["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"


@pytest.mark.parametrize("name", ["scheduler", "notebook"])
def test_published_ports_bind_to_localhost_only(services, name):
    ports = services[name]["ports"]
    assert ports
    for p in ports:
        assert isinstance(p, str) and p.startswith("127.0.0.1:"), f"{name} publishes {p!r} beyond localhost"


def test_no_service_publishes_on_all_interfaces(services):
    for name, svc in services.items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), (name, p)


def test_one_named_data_volume_at_the_same_path_everywhere(compose, services):
    assert list(compose["volumes"]) == ["data"]
    paths = set()
    for name, svc in services.items():
        named = [v for v in svc["volumes"] if v.split(":")[0] == "data"]
        assert len(named) == 1, f"{name} does not mount the data volume"
        paths.add(named[0].split(":")[1])
    assert paths == {"/data"}


def test_image_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(ln.startswith("COPY") and "pyproject.toml" in ln for ln in lines)
    assert any(ln.startswith("COPY") and "pipeline" in ln.split()[1:-1] for ln in lines)
    install = [ln for ln in lines if ln.startswith("RUN") and "pip install" in ln]
    assert install and re.search(r"pip install (\S+ )*\.( |$)", install[0]), install
    assert "jupyterlab" in install[0]
    assert any(ln.startswith("USER") and ln.split()[1] != "root" for ln in lines), "runs as root"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "**/*.zarr" in ignored


def test_readme_says_how_to_start_it_and_open_the_dashboard():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Scaling out", 1)[1]
    assert "docker compose up" in section and "--scale worker=" in section
    assert "http://127.0.0.1:8787/status" in section
    assert "JUPYTER_TOKEN" in section
