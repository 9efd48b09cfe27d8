"""The deploy files: the container image and the Procfile start the service the same way, as a
non-root user, with a health check that works, and WEB_CONCURRENCY scales the workers. No
container engine runs here, so the Dockerfile is checked statically and its commands for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import AUTH, GUNICORN, PYTHON_SERVICE, ROOT, UVICORN, Service, client_for, upstream_env, wait_until
from upstream import FakeUpstream


def dockerfile() -> dict[str, list[str]]:
    """Instructions by name, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.strip().partition(" ")
            instructions.setdefault(name.upper(), []).append(rest.strip())
    return instructions


def procfile_command() -> tuple[dict[str, str], list[str]]:
    """(environment assignments, command) of the Procfile's web process."""
    (line,) = [line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")]
    words = line.removeprefix("web:").split()
    assignments = dict(word.split("=", 1) for word in words if re.fullmatch(r"[A-Z_]+=\S*", word))
    return assignments, [word for word in words if word.split("=", 1)[0] not in assignments]


def test_the_image_runs_as_a_user_and_starts_like_the_procfile() -> None:
    docker = dockerfile()
    (user,) = docker["USER"]
    assert user not in ("root", "0")
    (cmd,) = docker["CMD"]
    command = json.loads(cmd)  # exec form: SIGTERM goes to the service, not to a shell
    assignments, procfile = procfile_command()
    assert command == procfile == ["python", "service.py"]
    env = " ".join(docker["ENV"])
    assert assignments == {"HOST": "0.0.0.0"} and "HOST=0.0.0.0" in env
    assert docker["EXPOSE"] == ["8000"] and "PORT=8000" in env


def test_dependencies_are_a_layer_of_their_own() -> None:
    steps = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(("COPY", "RUN pip"))]
    assert steps[:2] == ["COPY requirements.txt .", "RUN pip install -r requirements.txt"]
    assert "COPY service.py ." in steps[2:] and "COPY relay/ relay/" in steps[2:]


def test_the_ignore_file_keeps_secrets_and_clutter_out() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything is excluded unless listed
    assert sorted(lines[1:]) == ["!relay/", "!requirements.txt", "!service.py", "!static/"]


def test_the_health_check_command_works(start_service: Callable[..., Service]) -> None:
    service = start_service({"DEMO_SECONDS_PER_WORD": "0"})
    (healthcheck,) = dockerfile()["HEALTHCHECK"]
    assert "/healthz" in healthcheck
    command = json.loads(healthcheck.split("CMD", 1)[1])
    port = service.base_url.rsplit(":", 1)[1]
    assert subprocess.run(command, env={**os.environ, "PORT": port}, timeout=10).returncode == 0
    assert subprocess.run(command, env={**os.environ, "PORT": "1"}, capture_output=True, timeout=10).returncode != 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


TWO_WORKERS = {
    "python_service_py": (PYTHON_SERVICE, {"WEB_CONCURRENCY": "2"}),
    "uvicorn_workers": ([*UVICORN, "--workers", "2"], {}),
    "gunicorn_uvicorn_workers": ([*GUNICORN, "--workers", "2"], {}),
}


@pytest.mark.parametrize("launcher", sorted(TWO_WORKERS))
def test_two_workers_start_and_metrics_add_up(fake: FakeUpstream, start_service: Callable[..., Service], launcher: str) -> None:
    """Under `uvicorn service:app --workers 2`, three answers were served and /metrics counted two:
    each worker reported only its own counts."""
    command, env = TWO_WORKERS[launcher]
    service = start_service(upstream_env(fake, **env), command)
    wait_until(lambda: len(children(service.pid)) >= 2)  # uvicorn's supervisor and its two workers
    with client_for(service) as http:
        for _ in range(12):
            # A new connection each time, so the kernel spreads them over the workers.
            assert httpx.post(f"{service.base_url}/chat", json={"message": "hi"}, headers=AUTH).text == "Hello, world!"

        def served() -> list[float]:
            lines = http.get("/metrics").text.splitlines()
            return [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith('relay_requests_total{outcome="completed",route="/chat"')]

        # A worker counts a request just after its last byte left, so the last count may still be
        # on its way when the client already has the answer: wait for it, boundedly.
        wait_until(lambda: sum(served()) >= 12, timeout=5)
        assert served() == [12.0]
