"""The peers the service is measured against, each a route of this small app:

- POST /v1/chat/completions, at high load: the plain async pass-through that most people write,
  an `AsyncOpenAI` stream returned through a Starlette `StreamingResponse`.
- POST /plain-shape/v1/chat/completions, at 100 streams: the service's own shape written as
  plainly as it can be, the blocking `openai.OpenAI` client's raw stream read through
  `iterate_in_threadpool` into a `StreamingResponse`, bytes passed on as they come. What the shape
  costs with these libraries and nothing around it: the relay's cost is also a ratio to this.

    python bench/peer.py     # with OPENAI_BASE_URL and PORT set; bench/run.py starts it itself

No limits, no shedding, no heartbeats, no disconnect handling beyond what Starlette does: every
stream is admitted, and all of them share one event loop.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import openai
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def create_app() -> Starlette:
    client = openai.AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="bench", max_retries=0)

    async def completions(request: Request) -> Response:
        stream = await client.chat.completions.create(**await request.json())

        async def events():  # type: ignore[no-untyped-def]
            async for chunk in stream:
                yield b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    blocking = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="bench", max_retries=0)

    async def plain_shape(request: Request) -> Response:
        body = await request.json()
        upstream = await anyio.to_thread.run_sync(lambda: blocking.chat.completions.with_raw_response.create(**body))
        return StreamingResponse(iterate_in_threadpool(upstream.http_response.iter_raw()), media_type="text/event-stream")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def threads_for_every_stream(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1100  # anyio's default is 40
        yield

    routes = [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route(PLAIN_SHAPE, plain_shape, methods=["POST"]),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, lifespan=threads_for_every_stream)


PLAIN_SHAPE = "/plain-shape/v1/chat/completions"


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", access_log=False)
