"""Real servers on 127.0.0.1: the fake upstream (in this process) and the service (uvicorn, in a
subprocess started the way users start it), and clients that talk to them over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from upstream import FakeUpstream, Reply

ROOT = Path(__file__).resolve().parents[1]
# Tests never use the machine's real upstream, keys or collector, also where they import service.py itself.
for _name in [name for name in os.environ if name.startswith(("OPENAI_", "OTEL_")) or name == "API_KEYS"]:
    del os.environ[_name]
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
START_SECONDS = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 10, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            # gunicorn's arbiter keeps an inherited "ignore SIGINT" (a test run started in the
            # background has one); SIGTERM is a graceful stop under every launcher.
            self.process.send_signal(signal.SIGTERM if "gunicorn" in self.process.args else signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers it left behind, if any


def service_env(**env: str) -> dict[str, str]:
    """The test process's environment (without real upstream settings), plus `env`.

    Load shedding refuses new streams while the service runs 20 ms late, which a machine busy
    with other suites can make it; tests that are not about shedding must not see that, so their
    bound is generous (the shedding tests set their own)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "SHED_LAG_MS": "2000", **env}


# The ways users start the service; "{port}" stands for the free port the test picked.
PYTHON_SERVICE = [sys.executable, "service.py"]
UVICORN = [sys.executable, "-m", "uvicorn", "service:app", "--host", "127.0.0.1", "--port", "{port}"]
GUNICORN = [sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-b", "127.0.0.1:{port}", "service:app"]
LAUNCHERS = {"python_service_py": PYTHON_SERVICE, "uvicorn_service_app": UVICORN}


def launch(log_dir: Path, env: dict[str, str], command: list[str] | None = None) -> Service:
    """Start the service (`python service.py` unless `command` says otherwise) on a free loopback
    port and wait until /healthz answers."""
    for attempt in range(3):  # a free port can be taken between probing and binding; try another
        port = free_port()
        log_path = log_dir / f"service-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [part.replace("{port}", str(port)) for part in command or PYTHON_SERVICE],
                cwd=ROOT,
                env={**service_env(**env), "HOST": "127.0.0.1", "PORT": str(port)},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own: its workers are stopped with it
            )
        service = Service(process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{service.base_url}/healthz", timeout=1).status_code == 200:
                    return service
            except httpx.TransportError:
                time.sleep(0.05)
        service.stop()
        if "address already in use" not in service.log().lower():
            break
    raise AssertionError(f"the service did not start:\n{service.log()}")


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The session's fake upstream, with no queued replies or recorded requests."""
    upstream.reset()
    yield upstream
    upstream.reset()


@contextmanager
def holding(fake: FakeUpstream, pieces: list[str], sent: int) -> Iterator[threading.Event]:
    """The next reply sends its first `sent` pieces, then waits for the gate given back; the gate
    opens when the block ends too, so that a failed test never leaves the upstream waiting."""
    gate = threading.Event()
    fake.expect(Reply(pieces=pieces, gates={sent: gate}))
    try:
        yield gate
    finally:
        gate.set()


def upstream_env(upstream: FakeUpstream, **env: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "sk-upstream-secret-0123456789",
        "API_KEYS": f"{KEY},second-key",
        "OPENAI_MODEL": "fake-model",
        "UPSTREAM_MAX_RETRIES": "0",
        # A reader that leaves stops the answer at once, as tests of disconnects expect; the
        # tests of resuming set a grace window of their own.
        "RESUME_GRACE_SECONDS": "0",
        **env,
    }


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes under its supervisor `pid` (not multiprocessing's helper)."""
    children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


REDIS_SERVER = "/usr/bin/redis-server"  # Debian's redis-server package; .ci/run installs it


def start_redis(directory: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A real redis-server on a loopback port (`port`, so that a test can bring it back on the
    same one, or a free one), without persistence; returns it and its URL."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"the replay tests need {REDIS_SERVER}: apt-get install -y redis-server")
    for attempt in range(1 if port else 3):  # a probed port may be taken before redis binds it
        bound = port or free_port()
        command = [REDIS_SERVER, "--port", str(bound), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
        process = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", bound), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(64).startswith(b"+PONG"):
                        return process, f"redis://127.0.0.1:{bound}/0"
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait(timeout=5)
    raise AssertionError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis for the session."""
    process, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service as deployed: pointed at the fake upstream, with API keys."""
    running = launch(tmp_path_factory.mktemp("service"), upstream_env(upstream))
    yield running
    running.stop()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start a service with its own settings; stopped when the test ends."""
    started: list[Service] = []

    def start(env: dict[str, str], command: list[str] | None = None) -> Service:
        running = launch(tmp_path, env, command)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def client_for(service: Service, headers: dict[str, str] = AUTH) -> httpx.Client:
    """A client of `service`, with a client key unless told other `headers`."""
    return httpx.Client(base_url=service.base_url, headers=headers, timeout=10)


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with client_for(service) as http:
        yield http
