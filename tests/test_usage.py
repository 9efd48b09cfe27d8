"""Usage an operator can count on: when the upstream sends none for a /chat answer (llama.cpp
ignores include_usage) or the answer ended early (client gone, failure), `done`, the log line and
the token metrics report the pieces relayed as completion tokens, marked estimated; usage from the
upstream always wins."""

from __future__ import annotations

import json
import threading

import httpx

from conftest import Service, wait_until
from sse import whole_sse_events
from upstream import FakeUpstream, Reply

PIECES = ["one", " two", " three", " four"]
SSE = {"Accept": "text/event-stream"}
ESTIMATED = 'relay_completion_tokens_total{estimated="true",route="/chat"}'
REPORTED = 'relay_completion_tokens_total{estimated="false",route="/chat"}'


def line_for(service: Service, request_id: str) -> dict:
    def lines() -> list[dict]:
        *complete, _being_written = service.log().split("\n")  # the last line may be half written
        return [json.loads(line) for line in complete if line.startswith("{")]

    wait_until(lambda: any(line["request_id"] == request_id for line in lines()))
    return next(line for line in lines() if line["request_id"] == request_id)


def tokens(client: httpx.Client) -> dict[str, float]:
    samples = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("relay_completion_tokens_total"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def done_usage(body: str) -> dict:
    events = whole_sse_events(body)
    assert events[-1][0] == "done"
    return json.loads(events[-1][1])["usage"]


def test_no_usage_from_the_upstream_is_estimated_from_the_pieces(fake: FakeUpstream, service: Service, client: httpx.Client) -> None:
    before = tokens(client)
    fake.expect(Reply(pieces=PIECES, usage=None))
    response = client.post("/chat", json={"message": "hi"}, headers={**SSE, "X-Request-ID": "usage-none-1"})
    assert done_usage(response.text) == {"completion_tokens": 4, "estimated": True}
    line = line_for(service, "usage-none-1")
    assert (line["completion_tokens"], line["estimated"]) == (4, True)
    wait_until(lambda: tokens(client).get(ESTIMATED, 0) == before.get(ESTIMATED, 0) + 4)
    fake.expect(Reply(pieces=PIECES, usage=None))
    lines = client.post("/chat", json={"message": "hi"}, headers={"Accept": "application/x-ndjson"}).text.splitlines()
    assert json.loads(lines[-1])["usage"] == {"completion_tokens": 4, "estimated": True}


def test_the_upstreams_usage_wins(fake: FakeUpstream, service: Service, client: httpx.Client) -> None:
    before = tokens(client)
    fake.expect(Reply(pieces=PIECES, usage={"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}))
    response = client.post("/chat", json={"message": "hi"}, headers={**SSE, "X-Request-ID": "usage-real-1"})
    assert done_usage(response.text) == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    line = line_for(service, "usage-real-1")
    assert (line["completion_tokens"], line["estimated"]) == (9, False)
    wait_until(lambda: tokens(client).get(REPORTED, 0) == before.get(REPORTED, 0) + 9)
    assert tokens(client).get(ESTIMATED, 0) == before.get(ESTIMATED, 0)


def test_an_answer_the_client_left_counts_what_was_relayed(fake: FakeUpstream, service: Service, client: httpx.Client) -> None:
    release = threading.Event()
    fake.expect(Reply(pieces=PIECES, gates={2: release}))
    with client.stream("POST", "/chat", json={"message": "hi"}, headers={"X-Request-ID": "usage-left-1"}) as response:
        received = ""
        for text in response.iter_text():
            received += text
            if received == "one two":
                break
    line = line_for(service, "usage-left-1")
    assert line["outcome"] == "client_disconnected"
    assert (line["completion_tokens"], line["estimated"]) == (2, True)
    release.set()


def test_an_answer_that_failed_counts_what_was_relayed(fake: FakeUpstream, service: Service, client: httpx.Client) -> None:
    fake.expect(Reply(pieces=PIECES, drop_after=3))
    client.post("/chat", json={"message": "hi"}, headers={**SSE, "X-Request-ID": "usage-failed-1"})
    line = line_for(service, "usage-failed-1")
    assert line["outcome"] == "upstream_error"
    assert (line["completion_tokens"], line["estimated"]) == (3, True)
