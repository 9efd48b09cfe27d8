"""The peer the service is measured against at high load: the plain async pass-through that most
people write, an `AsyncOpenAI` stream returned through a Starlette `StreamingResponse`.

    python bench/peer.py     # with OPENAI_BASE_URL and PORT set; bench/run.py starts it itself

No limits, no shedding, no heartbeats, no disconnect handling beyond what Starlette does: every
stream is admitted, and all of them share one event loop.
"""

from __future__ import annotations

import os

import openai
import uvicorn
from starlette.applications import Starlette
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

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]), Route("/healthz", healthz)])


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", access_log=False)
