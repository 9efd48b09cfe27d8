"""Streaming, proven: each client holds the first piece while the upstream still holds back the
rest. Every test here fails if the service buffered the answer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import KEY, Service, wait_until
from sse import sse_events
from upstream import FakeUpstream, Reply, captured, expected_text

PIECES = ["The first", " piece", " and", " the", " rest", "."]
WHOLE = "".join(PIECES)


def held_reply(**options: object) -> tuple[Reply, threading.Event]:
    """A reply that sends its first piece, then waits for the test before sending the rest."""
    release = threading.Event()
    return Reply(pieces=PIECES, gates={1: release}, **options), release


def assert_still_held(fake: FakeUpstream, release: threading.Event) -> None:
    assert not release.is_set()
    assert fake.requests[-1].pieces_sent == 1, "the upstream sent more than the first piece"


def first_where(items: Iterator[str], predicate: object) -> str:
    for item in items:
        if predicate(item):  # type: ignore[operator]
            return item
    raise AssertionError("the stream ended before the expected item")


# -- /chat, each framing ----------------------------------------------------------------------------


def test_plain_text_raw_bytes_arrive_before_the_rest_exists(fake: FakeUpstream, client: httpx.Client) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    with client.stream("POST", "/chat", json={"message": "hi"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.iter_raw()
        assert next(raw) == b"The first"
        assert_still_held(fake, release)
        release.set()
        rest = b"".join(raw)
    assert rest.decode() == WHOLE[len("The first") :]


def test_plain_text_iter_text(fake: FakeUpstream, client: httpx.Client) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    with client.stream("GET", "/chat", params={"q": "hi"}) as response:
        texts = response.iter_text()
        first = next(texts)
        assert first == "The first"
        assert_still_held(fake, release)
        release.set()
        assert first + "".join(texts) == WHOLE


def test_line_iteration_gets_each_line_as_it_completes(fake: FakeUpstream, client: httpx.Client) -> None:
    release = threading.Event()
    fake.expect(Reply(pieces=["line one\n", "line two\n", "line three"], gates={1: release}))
    with client.stream("POST", "/chat", json={"message": "hi"}) as response:
        lines = response.iter_lines()
        assert next(lines) == "line one"
        assert not release.is_set() and fake.requests[-1].pieces_sent == 1
        release.set()
        assert list(lines) == ["line two", "line three"]


def test_sse_deltas_then_done(fake: FakeUpstream, client: httpx.Client) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    headers = {"Accept": "text/event-stream"}
    with client.stream("POST", "/chat", json={"message": "hi"}, headers=headers) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = sse_events(response.iter_lines())
        assert next(events) == ("delta", json.dumps({"text": "The first"}))
        assert_still_held(fake, release)
        release.set()
        rest = list(events)
    texts = [json.loads(data)["text"] for name, data in rest if name == "delta"]
    assert "The first" + "".join(texts) == WHOLE
    assert rest[-1][0] == "done"
    done = json.loads(rest[-1][1])
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}


def test_ndjson_deltas_then_done(fake: FakeUpstream, client: httpx.Client) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    headers = {"Accept": "application/x-ndjson"}
    with client.stream("POST", "/chat", json={"message": "hi"}, headers=headers) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.iter_lines()
        assert json.loads(next(lines)) == {"type": "delta", "text": "The first"}
        assert_still_held(fake, release)
        release.set()
        rest = [json.loads(line) for line in lines]
    assert "The first" + "".join(item["text"] for item in rest[:-1]) == WHOLE
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("", "text/plain; charset=utf-8"),
        ("*/*", "text/plain; charset=utf-8"),
        ("text/plain", "text/plain; charset=utf-8"),
        ("text/event-stream", "text/event-stream; charset=utf-8"),
        ("application/x-ndjson", "application/x-ndjson"),
        ("text/html, text/event-stream;q=0.9, */*;q=0.1", "text/event-stream; charset=utf-8"),
        ("application/x-ndjson;q=0.5, text/plain;q=0.8", "text/plain; charset=utf-8"),
    ],
)
def test_content_negotiation(fake: FakeUpstream, client: httpx.Client, accept: str, media_type: str) -> None:
    response = client.post("/chat", json={"message": "hi"}, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type


def test_unacceptable_accept_header_is_406(client: httpx.Client) -> None:
    response = client.post("/chat", json={"message": "hi"}, headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "not_acceptable"


def test_chat_forwards_the_request_fields(fake: FakeUpstream, client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"messages": messages, "model": "other-model", "temperature": 0.5, "max_tokens": 7}
    assert client.post("/chat", json=body).status_code == 200
    sent = fake.requests[-1].body
    assert sent["messages"] == messages
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["stream"]) == ("other-model", 0.5, 7, True)
    client.get("/chat", params={"q": "plain question"})
    sent = fake.requests[-1].body
    assert sent["messages"] == [{"role": "user", "content": "plain question"}]
    assert sent["model"] == "fake-model"


# -- /v1/chat/completions -------------------------------------------------------------------------


def completion_body(**fields: object) -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_openai_sse_is_passed_through_chunk_by_chunk(fake: FakeUpstream, client: httpx.Client) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    body = completion_body(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = sse_events(response.iter_lines())
        role = json.loads(next(events)[1])
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert json.loads(next(events)[1])["choices"][0]["delta"]["content"] == "The first"
        assert_still_held(fake, release)
        release.set()
        rest = [data for _, data in events]
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(data) for data in rest[:-1]]
    assert "The first" + "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == WHOLE
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}


def test_openai_sdk_streams_through_the_service(fake: FakeUpstream, service: Service) -> None:
    reply, release = held_reply()
    fake.expect(reply)
    sdk = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=KEY, max_retries=0, timeout=10)
    stream = sdk.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    texts = (chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert first_where(texts, bool) == "The first"
    assert_still_held(fake, release)
    release.set()
    assert "The first" + "".join(texts) == WHOLE


def test_openai_sdk_without_streaming(fake: FakeUpstream, service: Service) -> None:
    fake.expect(Reply(pieces=PIECES))
    sdk = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=KEY, max_retries=0, timeout=10)
    completion = sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == WHOLE
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert fake.requests[-1].body.get("stream") in (None, False)


def test_unknown_fields_reach_the_upstream(fake: FakeUpstream, client: httpx.Client) -> None:
    body = completion_body(stream=True, seed=7, logit_bias={"50256": -100}, vendor_extension={"a": [1]})
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    sent = fake.requests[-1].body
    assert (sent["seed"], sent["logit_bias"], sent["vendor_extension"]) == (7, {"50256": -100}, {"a": [1]})


def test_model_defaults_to_openai_model(fake: FakeUpstream, client: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert fake.requests[-1].body["model"] == "fake-model"


def test_done_is_added_when_the_upstream_omits_it(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.expect(Reply(raw=captured("cerebras_no_done")))
    text = client.post("/v1/chat/completions", json=completion_body(stream=True)).text
    assert text.endswith("data: [DONE]\n\n")
    assert text.count("data: [DONE]") == 1


# -- bytes that real upstreams send ---------------------------------------------------------------


def release_after_first_write(fake: FakeUpstream, release: threading.Event) -> None:
    """Let the service read the first half alone before the second half is written."""
    wait_until(lambda: fake.requests[-1].pieces_sent >= 1)
    time.sleep(0.05)
    release.set()


def test_multibyte_characters_split_across_upstream_reads(fake: FakeUpstream, client: httpx.Client) -> None:
    """An emoji's four bytes cut in half between two upstream writes still reach every client whole."""
    event = 'data: {"choices":[{"index":0,"delta":{"content":"héllo 👋 世界"},"finish_reason":null}]}\n\n'.encode()
    cut = event.index("👋".encode()) + 2
    end = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    for accept in ("text/plain", "application/x-ndjson", "text/event-stream"):
        release = threading.Event()
        fake.expect(Reply(raw_chunks=[event[:cut], event[cut:] + end], gates={1: release}))
        with client.stream("POST", "/chat", json={"message": "hi"}, headers={"Accept": accept}) as response:
            release_after_first_write(fake, release)
            body = response.read().decode("utf-8")  # strict: a split character would raise here
        assert "héllo 👋 世界" in body
    release = threading.Event()
    fake.expect(Reply(raw_chunks=[event[:cut], event[cut:] + end], gates={1: release}))
    with client.stream("POST", "/v1/chat/completions", json=completion_body(stream=True)) as response:
        release_after_first_write(fake, release)
        chunks = [json.loads(data) for _, data in sse_events(response.iter_lines()) if data != "[DONE]"]
    assert chunks[0]["choices"][0]["delta"]["content"] == "héllo 👋 世界"


@pytest.mark.parametrize(
    "name",
    [
        "openai_gpt4o_text_usage",
        "openai_gpt4o_length",
        "openai_gpt4o_refusal",
        "openai_gpt4o_n3_multichoice",
        "openai_gpt4o_parallel_tool_calls",
        "openai_gpt4o_long_json",
        "openai_gpt4o_logprobs",
        "openai_gpt5nano_text_obfuscation",
        "openai_gpt5nano_length_no_content",
        "openrouter_llama32_comment",
        "ollama_llama31_text",
        "ollama_llama31_tool_call",
        "openrouter_sambanova_emoji",
        "openrouter_deepseek_r1_reasoning_long",
        "tgi_llama31_length",
        "hyperbolic_vllm_style_length",
        "cerebras_no_done",
        "together_extra_fields",
    ],
)
def test_captured_streams_stream_their_exact_text(fake: FakeUpstream, client: httpx.Client, name: str) -> None:
    """Each capture is replayed event by event, its last event held back until the client has
    what came before it: the exact text on /chat, the exact events on /v1/chat/completions."""
    raw = captured(name)
    last = len([event for event in raw.split(b"\n\n") if event]) - 1
    text, release = expected_text(name), threading.Event()
    fake.expect(Reply(raw=raw, gates={last: release}))
    with client.stream("POST", "/chat", json={"message": "hi"}) as response:
        pieces = response.iter_text()
        first = next(pieces, "") if text else ""
        assert not release.is_set() and not fake.requests[-1].finished
        release.set()
        assert first + "".join(pieces) == text

    release = threading.Event()
    fake.expect(Reply(raw=raw, gates={last: release}))
    with client.stream("POST", "/v1/chat/completions", json=completion_body(stream=True)) as response:
        events = sse_events(response.iter_lines())
        relayed = [next(events)[1]]
        assert not release.is_set() and not fake.requests[-1].finished
        release.set()
        relayed += [data for _, data in events]
    assert relayed[-1] == "[DONE]"
    original = [data for _, data in sse_events(iter(raw.decode().replace("\r\n", "\n").split("\n") + [""]))]
    assert [data for data in relayed if data != "[DONE]"] == [data for data in original if data != "[DONE]"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat"])
def test_answers_one_after_the_other_reuse_one_upstream_connection(fake: FakeUpstream, client: httpx.Client, path: str) -> None:
    """An answer read to the end of its body ([DONE], then the chunked body's last chunk) leaves
    its upstream connection to the next one: no new connection (and TIME_WAIT socket) per answer."""
    v1 = path.startswith("/v1")
    fake.expect(*[Reply(delay=0.01) for _ in range(3)])  # paced, as models send: not all in one read
    for _ in range(3):
        response = client.post(path, json=completion_body(stream=True) if v1 else {"message": "hi"})
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n") if v1 else response.text == "Hello, world!"
    connections = {request.connection for request in fake.wait_for_requests(3)}
    assert len(connections) == 1, connections
