"""CPU placement (PIN_WORKERS=1): each worker process keeps its threads on one CPU of its own.

Each relayed token passes the GIL between two threads: a worker thread reads it from the
upstream, the event loop writes it to the client. Left to the kernel, those threads run on
any core, so each hand-off wakes a thread on another core (often moving it), and a worker
thread woken by its upstream preempts the event loop only to find the GIL taken: at 100
streams, about 12 context switches and 20 futex calls per token, most of the relay's CPU.
Pinned, a worker process claims a CPU that no other worker process on the machine has claimed
while there are enough, and keeps all its threads there, where a hand-off is a switch on one
core; and its upstream threads are batch work (SCHED_BATCH), which does not preempt the event
loop on waking. One process gains little from a second core, since its Python runs one thread
at a time. But a pinned process cannot move away from a core that other programs keep busy,
so this is for machines (or containers with CPUs of their own) that the service does not share.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import suppress
from pathlib import Path


class CpuPlacement:
    """Where this process's threads run: anywhere (the default), or on one CPU."""

    def __init__(self) -> None:
        self.cpu: int | None = None
        self._claim: socket.socket | None = None  # held for the process's life; the claim ends with it
        self._batch_threads = threading.local()

    def pin(self) -> int | None:
        """Claim a CPU and move every thread of this process to it (threads started later inherit
        it); return the CPU, or None where there is no choice to make."""
        if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
            return None  # Linux only
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        cpu = self._claim_one(allowed)
        for thread in os.listdir("/proc/self/task"):
            with suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(int(thread), {cpu})
        self.cpu = cpu
        return cpu

    def _claim_one(self, allowed: list[int]) -> int:
        # An abstract Unix socket name is bound by one process at a time, and freed when it exits:
        # worker processes started by any launcher, and their replacements, spread over the CPUs.
        for cpu in allowed:
            claim = socket.socket(socket.AF_UNIX)
            try:
                claim.bind(f"\0streaming-relay-cpu-{cpu}")
            except OSError:
                claim.close()
                continue
            self._claim = claim
            return cpu
        return allowed[os.getpid() % len(allowed)]  # more worker processes than CPUs: they share

    def upstream_thread(self) -> None:
        """Called in a worker thread before each upstream read: the first time, a pinned process
        makes the thread batch work."""
        if self.cpu is not None and not getattr(self._batch_threads, "set", False):
            self._batch_threads.set = True
            with suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


placement = CpuPlacement()
