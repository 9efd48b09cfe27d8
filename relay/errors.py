"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, before and after
a response started: the OpenAI SDKs and the chat UIs built on them show these to people."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response


class ServiceError(Exception):
    """An answer that is not the model's: an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | int | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        outcome: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})
        self.upstream_status: int | None = None  # the upstream's HTTP status, when this answers for one
        self.outcome = outcome  # how the log line says the request ended, if not by its type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encoded(self) -> bytes:
        """The body as ASCII JSON: a message that quotes the client's input may hold characters
        (a lone surrogate) that UTF-8 cannot encode, and \\u escapes always can."""
        return json.dumps(self.body()).encode()

    def response(self) -> Response:
        return Response(self.encoded(), status_code=self.status, headers=self.headers, media_type="application/json")


class StreamFailure(Exception):
    """The stream cannot go on after the response started; the client gets a terminal error frame."""

    def __init__(self, type: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.type, self.message, self.code = type, message, code

    def error(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": None, "code": self.code}
