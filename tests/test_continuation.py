"""Answers that do not stop mid-sentence: on /chat an answer the output limit cut is continued in
the same response, seamlessly, with usage summed over every round."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import pytest

from conftest import Service, client_for, launch, upstream_env, wait_until
from sse import sse_events
from upstream import FakeUpstream, Reply

ANSWER = (
    "Streaming matters because people read while the model writes. A gateway that waits for the "
    "whole answer wastes their time; one that streams lets them start at once — même en français, "
    "或者用中文, with emoji 👋 too. That is the whole point of this service."
)
ROUND_CHARS = len(ANSWER) // 4 + 1  # the fake upstream's "output limit": four rounds for ANSWER
INSTRUCTION_WORDS = "Continue exactly where it stopped"


def rounds_of(answer: str, limit: int) -> int:
    return -(-len(answer) // limit)


def continuing_upstream(answer: str = ANSWER, limit: int = ROUND_CHARS, overlap: str = "") -> Callable[[dict], Reply]:
    """An upstream that answers `answer` `limit` characters a round, continuing from the partial
    answer it is sent, as a real model does when asked to go on. `overlap` is prepended to each
    continuation, as models sometimes restate the last words."""

    def reply(body: dict) -> Reply:
        messages = body["messages"]
        continuing = INSTRUCTION_WORDS in str(messages[-1].get("content"))
        done = messages[-2]["content"] if continuing else ""
        assert answer.startswith(done), "the continuation request does not carry the answer so far"
        part = answer[len(done) : len(done) + limit]
        finish = "stop" if len(done) + len(part) >= len(answer) else "length"
        pieces = [part[i : i + 7] for i in range(0, len(part), 7)]
        if continuing and overlap:
            pieces.insert(0, done[-len(overlap) :])
        usage = {"prompt_tokens": 10 * (1 + len(messages)), "completion_tokens": len(pieces), "total_tokens": 10 * (1 + len(messages)) + len(pieces)}
        return Reply(pieces=pieces, finish_reason=finish, usage=usage)

    return reply


def chat_events(service: Service, body: dict[str, object]) -> list[tuple[str, dict]]:
    with client_for(service) as http:
        with http.stream("POST", "/chat", json=body, headers={"Accept": "text/event-stream"}) as response:
            assert response.status_code == 200
            return [(name, json.loads(data)) for name, data in sse_events(response.iter_lines())]


def text_of(events: list[tuple[str, dict]]) -> str:
    return "".join(data["text"] for name, data in events if name == "delta")


def test_an_answer_cut_three_times_arrives_whole(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream()
    assert rounds_of(ANSWER, ROUND_CHARS) == 4
    events = chat_events(service, {"message": "Why stream?", "max_continuations": 5})
    assert text_of(events) == ANSWER
    name, done = events[-1]
    assert name == "done"
    assert done["finish_reason"] == "stop" and done["continuations"] == 3
    usages = [r.body for r in fake.requests]
    assert len(usages) == 4
    replies = [continuing_upstream()(body) for body in usages]
    assert done["usage"] == {
        "prompt_tokens": sum(r.usage["prompt_tokens"] for r in replies),
        "completion_tokens": sum(r.usage["completion_tokens"] for r in replies),
        "total_tokens": sum(r.usage["total_tokens"] for r in replies),
    }
    assert all(body["stream_options"] == {"include_usage": True} for body in usages)


def test_the_continuation_request_carries_the_answer_so_far(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream()
    messages = [{"role": "system", "content": "Be clear."}, {"role": "user", "content": "Why stream?"}]
    chat_events(service, {"messages": messages, "max_continuations": 1, "temperature": 0.3})
    first, second = (r.body for r in fake.requests)
    assert first["messages"] == messages
    assert second["messages"][:2] == messages
    assert second["messages"][2] == {"role": "assistant", "content": ANSWER[:ROUND_CHARS]}
    assert second["messages"][3]["role"] == "user" and INSTRUCTION_WORDS in second["messages"][3]["content"]
    assert second["temperature"] == 0.3 and second["model"] == first["model"]


@pytest.mark.parametrize("accept", ["text/plain", "application/x-ndjson"])
def test_every_framing_gets_one_seamless_text(fake: FakeUpstream, service: Service, accept: str) -> None:
    fake.default = continuing_upstream()
    with client_for(service) as http:
        response = http.post("/chat", json={"message": "Why?", "max_continuations": 8}, headers={"Accept": accept})
    if accept == "text/plain":
        assert response.text == ANSWER
    else:
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert "".join(line["text"] for line in lines[:-1]) == ANSWER
        assert lines[-1]["type"] == "done" and lines[-1]["continuations"] == 3


def test_restated_words_and_doubled_spaces_are_removed_at_the_join(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream(overlap="ers, ")  # shorter than the 8 characters it trusts
    text = text_of(chat_events(service, {"message": "Why?", "max_continuations": 8}))
    assert text != ANSWER  # a 5-character overlap may be chance, so it is kept
    fake.default = continuing_upstream(overlap="model writes. A ")
    assert text_of(chat_events(service, {"message": "Why?", "max_continuations": 8})) == ANSWER
    answer = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    cut = answer.index("nine") + len("nine ")  # the first round ends with a space
    fake.default = continuing_upstream(answer=answer, limit=cut)
    fake.expect(Reply(pieces=[answer[:cut]], finish_reason="length"), Reply(pieces=[" " + answer[cut:]]))
    assert text_of(chat_events(service, {"message": "Count.", "max_continuations": 1})) == answer


def test_the_limit_holds(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream()
    events = chat_events(service, {"message": "Why?", "max_continuations": 1})
    assert text_of(events) == ANSWER[: 2 * ROUND_CHARS]
    assert events[-1][1]["finish_reason"] == "length" and events[-1][1]["continuations"] == 1
    assert len(fake.requests) == 2


def test_continuation_is_off_unless_asked(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream()
    events = chat_events(service, {"message": "Why?"})
    assert text_of(events) == ANSWER[:ROUND_CHARS]
    assert events[-1][1]["finish_reason"] == "length" and events[-1][1]["continuations"] == 0
    assert len(fake.requests) == 1


def test_v1_chat_completions_is_never_continued(fake: FakeUpstream, service: Service) -> None:
    fake.default = continuing_upstream()
    with client_for(service) as http:
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Why?"}], "stream": True})
    assert len(fake.requests) == 1


@pytest.fixture(scope="module")
def continuing_service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = upstream_env(upstream, HEARTBEAT_SECONDS="0.2", MAX_CONTINUATIONS="3")
    running = launch(tmp_path_factory.mktemp("continuing"), env)
    yield running
    running.stop()


def test_a_disconnect_in_round_two_closes_round_two(fake: FakeUpstream, continuing_service: Service) -> None:
    hold = threading.Event()
    fake.expect(Reply(pieces=["The first round"], finish_reason="length"), Reply(pieces=[" goes on"], gates={0: hold}, hold_headers=True))
    with client_for(continuing_service) as http:
        with http.stream("POST", "/chat", json={"message": "hi"}, headers={"Accept": "text/event-stream"}) as response:
            lines = (line for line in response.iter_lines() if not line.startswith("id: "))  # resume ids
            assert [next(lines), next(lines)] == ["retry: 1000", ""]
            assert next(lines) == "event: delta"
            fake.wait_for_requests(2)
            assert [next(lines), next(lines)] == ['data: {"text": "The first round"}', ""]
            # Heartbeats keep flowing while the next round has not said anything yet.
            assert [next(lines), next(lines)] == [": ping", ""]
    round_two = fake.requests[1]
    assert round_two.closed.wait(5) and not hold.is_set()


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_a_failure_in_round_two_ends_with_an_error_after_the_text(fake: FakeUpstream, continuing_service: Service, fault: str) -> None:
    second = Reply(status=500) if fault == "status" else Reply(pieces=[" and", " more"], drop_after=1)
    fake.expect(Reply(pieces=["The first round"], finish_reason="length"), second)
    events = chat_events(continuing_service, {"message": "hi"})
    expected = "The first round" + ("" if fault == "status" else " and")
    assert text_of(events) == expected
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "upstream_error"
    wait_until(lambda: all(r.closed.is_set() for r in fake.requests))
    assert len(fake.requests) == 2


def test_a_continuation_refused_with_an_unusual_error_type_still_ends_with_that_error(
    fake: FakeUpstream, continuing_service: Service
) -> None:
    """A 429 on round two carries the upstream's own error type ("requests"), which has no outcome
    of its own: the stream must still end with the error event, and the log line say "error"."""
    fake.expect(Reply(pieces=["The first round"], finish_reason="length"), Reply(status=429))
    with client_for(continuing_service) as http:
        body = {"message": "hi", "max_continuations": 1}
        response = http.post("/chat", json=body, headers={"Accept": "text/event-stream", "X-Request-ID": "unusual-type-1"})
    events = [(name, json.loads(data)) for name, data in sse_events(response.text.split("\n"))]
    assert text_of(events) == "The first round"
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "requests"
    wait_until(lambda: '"request_id": "unusual-type-1"' in continuing_service.log())
    line = next(json.loads(line) for line in continuing_service.log().splitlines() if '"request_id": "unusual-type-1"' in line)
    assert line["outcome"] == "error"
