"""The demo model: a simulated OpenAI-compatible upstream, served over loopback HTTP so that the
demo (no OPENAI_API_KEY, no OPENAI_BASE_URL) goes through exactly the production path: openai
client, worker thread, StreamingResponse."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from relay.errors import ServiceError
from relay.transcript import CONTINUE_INSTRUCTION

DEMO_ANSWER = (
    "This is the built-in demo model, not a real one. Each word you see left the model a moment "
    "ago and reached you at once: the service reads the model's stream in a worker thread and "
    "writes every piece to you as it arrives, instead of collecting the whole answer first. "
    "Set OPENAI_API_KEY to talk to OpenAI, or OPENAI_BASE_URL to use vLLM, Ollama or llama.cpp."
)


def demo_words(messages: list[dict[str, Any]]) -> list[str]:
    """The demo's answer, word by word; asked to continue a cut answer, the words it lacks."""
    questions = [m.get("content") for m in messages if m.get("role") == "user" and m.get("content") != CONTINUE_INSTRUCTION]
    asked = questions[-1] if questions else ""
    if not isinstance(asked, str):
        asked = "(a message with several parts)"
    asked = " ".join(asked.split())
    echo = f'You asked: "{asked[:120]}{"…" if len(asked) > 120 else ""}". ' if asked else ""
    text = echo + DEMO_ANSWER
    if messages and messages[-1].get("content") == CONTINUE_INSTRUCTION and len(messages) >= 2:
        answered = messages[-2].get("content")
        if isinstance(answered, str) and text.startswith(answered):
            text = text[len(answered) :]
    words = text.split(" ")
    return [word if index == 0 else " " + word for index, word in enumerate(words) if word or index > 0]


DEMO_MAX_CHOICES = 8


def demo_choices(body: Mapping[str, Any]) -> int:
    """How many choices a demo completion has: OpenAI's `n`, checked as OpenAI checks it."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= DEMO_MAX_CHOICES:
        raise ServiceError(400, f"'n' must be a whole number from 1 to {DEMO_MAX_CHOICES} for the demo model.", param="n")
    return n


class DemoModel:
    """The demo upstream: its own uvicorn server on a loopback port, in a background thread."""

    def __init__(self, seconds_per_word: float) -> None:
        self.seconds_per_word = seconds_per_word
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/v1/responses", self.respond, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.retrieve_model, methods=["GET"]),
                Route("/v1/responses/{response_id}{action:path}", self.stored_response, methods=["GET", "POST", "DELETE"]),
            ]
        )
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve([self._socket])), name="demo-model", daemon=True)

    def start(self) -> DemoModel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        try:
            choices = demo_choices(body)
        except ServiceError as error:
            return error.response()
        model = body.get("model") or "demo"
        # Like a real server: one id and one creation time for every chunk of a completion.
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
        words = demo_words(body.get("messages") or [])
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or len(words)
        finish_reason = "length" if limit < len(words) else "stop"
        words = words[:limit]
        usage = {"prompt_tokens": 12, "completion_tokens": choices * len(words), "total_tokens": 12 + choices * len(words)}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return JSONResponse(
                {**head, "object": "chat.completion", "usage": usage,
                 "choices": [{"index": index, "message": message, "finish_reason": finish_reason} for index in range(choices)]}
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
            event: dict[str, Any] = {**head, "object": "chat.completion.chunk", "choices": []}
            if delta is not None:
                event["choices"] = [{"index": index, "delta": delta, "finish_reason": finish} for index in range(choices)]
            if usage is not None:
                event["usage"] = usage
            return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for word in words:
                await anyio.sleep(self.seconds_per_word)
                yield chunk({"content": word})
            yield chunk({}, finish_reason)
            if include_usage:
                yield chunk(usage=usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [DEMO_MODEL]})

    async def retrieve_model(self, request: Request) -> Response:
        if request.path_params["model"] != DEMO_MODEL["id"]:
            error = ServiceError(404, f"The demo serves only the model 'demo', not {request.path_params['model']!r}.", code="model_not_found")
            return error.response()
        return JSONResponse(DEMO_MODEL)

    async def stored_response(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        message = f"Response with id '{response_id}' not found: the demo model stores no responses."
        return ServiceError(404, message, code="not_found").response()

    async def respond(self, request: Request) -> Response:
        """The Responses API, with OpenAI's event sequence."""
        body = await request.json()
        model = body.get("model") or "demo"
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else [i for i in given or () if isinstance(i, dict)]
        words = demo_words(items)
        limit = body.get("max_output_tokens") or len(words)
        status = "incomplete" if limit < len(words) else "completed"
        words = words[:limit]
        text = "".join(words)
        response_id, item_id = f"resp_demo{uuid.uuid4().hex}", f"msg_demo{uuid.uuid4().hex}"
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12 + len(words)}

        def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
                    "output": output, "usage": usage, "incomplete_details": incomplete, "error": None,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

        if not body.get("stream"):
            return JSONResponse(response(status, [item], usage))
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}

        async def events() -> AsyncIterator[bytes]:
            sequence = iter(range(1_000_000))

            def event(kind: str, **fields: Any) -> bytes:
                data = json.dumps({"type": kind, "sequence_number": next(sequence), **fields}, ensure_ascii=False)
                return f"event: {kind}\ndata: {data}\n\n".encode()

            yield event("response.created", response=response("in_progress", [], None))
            yield event("response.in_progress", response=response("in_progress", [], None))
            yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", **at, part={**part, "text": ""})
            for word in words:
                await anyio.sleep(self.seconds_per_word)
                yield event("response.output_text.delta", **at, delta=word)
            yield event("response.output_text.done", **at, text=text)
            yield event("response.content_part.done", **at, part=part)
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(f"response.{status}", response=response(status, [item], usage))

        return StreamingResponse(events(), media_type="text/event-stream")


DEMO_MODEL = {"id": "demo", "object": "model", "created": 1764547200, "owned_by": "streaming-relay (built-in demo, not a real model)"}
