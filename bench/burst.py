"""A burst of openai SDK clients that all start a stream at the same moment, against one worker.

    python bench/burst.py                       # 60 and 120 clients, about 30 s on 2 cores
    python bench/burst.py --clients 200 --service /tmp/copy/service.py

Each client is `openai.OpenAI` with its default retries (two, honouring Retry-After-Ms, else
Retry-After), streaming 40 tokens at 20 tokens/s from the fake upstream. The same burst runs first
straight against the upstream, then through the service (one worker, default settings). It prints,
for each, how many streams were served and how many failed, and the time until the last one ended.
A worker refuses part of a burst (load shedding); what matters is that the retries of the refused
clients do not all come back at once, so that the SDK's own retries get every stream served.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import tempfile
import threading
import time
from pathlib import Path

import openai

from run import HERE, Processes, servers_stopped_at_the_end, start_service, start_upstream

TOKENS = 40
MODEL = "bench-20"  # 20 tokens/s


def burst(base_url: str, clients: int) -> tuple[collections.Counter[str], float]:
    """`clients` SDK clients start one stream each at the same moment; what became of each."""
    sdks = [openai.OpenAI(base_url=base_url, api_key="bench", timeout=60) for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def stream(sdk: openai.OpenAI) -> str:
        start.wait(timeout=30)
        try:
            chunks = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "burst"}], max_tokens=TOKENS, stream=True
            )
            for _ in chunks:
                pass
            return "served"
        except openai.APIStatusError as error:
            return f"failed ({error.status_code})"
        except openai.OpenAIError as error:
            return f"failed ({type(error).__name__})"

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outcomes = [pool.submit(stream, sdk) for sdk in sdks]
        start.wait(timeout=30)
        began = time.monotonic()
        counts = collections.Counter(outcome.result(timeout=120) for outcome in outcomes)
    return counts, time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="60,120", help="comma-separated burst sizes")
    parser.add_argument("--service", type=Path, default=HERE.parent / "service.py", help="the service.py to run")
    args = parser.parse_args()
    sizes = [int(size) for size in args.clients.split(",")]
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-burst-")))
    with servers_stopped_at_the_end(processes):
        _, upstream_port = start_upstream(processes)
        _, service_port = start_service(processes, args.service.resolve(), upstream_port)
        print(f"{'clients':>8} {'path':<22} {'served':>7} {'failed':>7} {'seconds':>8}  outcomes")
        for size in sizes:
            for path, port in (("direct to upstream", upstream_port), ("/v1/chat/completions", service_port)):
                counts, seconds = burst(f"http://127.0.0.1:{port}/v1", size)
                failed = size - counts["served"]
                print(f"{size:>8} {path:<22} {counts['served']:>7} {failed:>7} {seconds:>8.1f}  {dict(counts)}")
                time.sleep(2)  # the worker's learnt limit, if any, returns before the next burst


if __name__ == "__main__":
    main()
