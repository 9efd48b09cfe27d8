"""PIN_WORKERS=1: each worker process keeps all its threads on one CPU of its own, and its
upstream threads are batch work; left unset, the kernel places the threads. Read from /proc,
of services started the way users start them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx

from conftest import AUTH, Service, upstream_env, wait_until, workers_of
from upstream import FakeUpstream

SCHED_BATCH = 3  # the policy field of /proc/<pid>/task/<tid>/stat


def threads(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())


def cpus_of(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets the process's threads may run on."""
    found = set()
    for thread in threads(pid):
        try:
            found.add(frozenset(os.sched_getaffinity(int(thread.name))))
        except OSError:
            pass  # the thread has just ended
    return found


def batch_threads(pid: int) -> int:
    count = 0
    for thread in threads(pid):
        try:
            fields = (thread / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += int(fields[38]) == SCHED_BATCH  # field 41 of proc(5), counted after the name
    return count


def stream_once(service: Service) -> None:
    response = httpx.post(f"{service.base_url}/chat", json={"message": "hi"}, headers=AUTH, timeout=10)
    assert response.text == "Hello, world!"


def test_every_thread_of_a_pinned_worker_runs_on_one_cpu(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    assert len(os.sched_getaffinity(0)) >= 2, "this test needs a machine with two CPUs, as CI has"
    service = start_service(upstream_env(fake, PIN_WORKERS="1"))
    stream_once(service)
    (cpus,) = cpus_of(service.pid)  # one set for all threads, the worker threads started later included
    assert len(cpus) == 1
    assert f"its threads run on CPU {min(cpus)} (PIN_WORKERS=1)" in service.log()
    assert batch_threads(service.pid) >= 1  # the thread that read the upstream
    main_stat = Path(f"/proc/{service.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(main_stat[38]) != SCHED_BATCH  # the event loop is not


def test_pinned_services_on_one_machine_take_different_cpus(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    first = start_service(upstream_env(fake, PIN_WORKERS="1"))
    second = start_service(upstream_env(fake, PIN_WORKERS="1"))
    (first_cpus,), (second_cpus,) = cpus_of(first.pid), cpus_of(second.pid)
    assert len(first_cpus) == len(second_cpus) == 1 and first_cpus != second_cpus
    first.stop()  # its claim ends with it: a replacement takes its CPU
    third = start_service(upstream_env(fake, PIN_WORKERS="1"))
    assert cpus_of(third.pid) == {first_cpus}
    stream_once(third)


def test_pinned_workers_of_one_service_take_different_cpus(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, PIN_WORKERS="1", WEB_CONCURRENCY="2"))
    wait_until(lambda: len(workers_of(service.pid)) == 2)
    placed: list[set[frozenset[int]]] = []

    def both_pinned() -> bool:
        placed[:] = [cpus_of(worker) for worker in workers_of(service.pid)]
        return all(len(cpus) == 1 and len(next(iter(cpus))) == 1 for cpus in placed)

    wait_until(both_pinned)
    assert placed[0] != placed[1]


def test_without_pin_workers_the_kernel_places_the_threads(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake))
    stream_once(service)
    assert cpus_of(service.pid) == {frozenset(os.sched_getaffinity(0))}
    assert batch_threads(service.pid) == 0
