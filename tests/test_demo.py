"""The demo model (no OPENAI_API_KEY, no OPENAI_BASE_URL) answers like a real OpenAI server in the
fields clients read, and a service without client keys keeps /metrics as open as its API."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import Service, launch

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = launch(tmp_path_factory.mktemp("demo"), {"DEMO_SECONDS_PER_WORD": "0"})
    yield running
    running.stop()


def stream_chunks(demo: Service, **fields: object) -> list[dict]:
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}, **fields}
    events = httpx.post(f"{demo.base_url}/v1/chat/completions", json=body, timeout=10).text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def test_one_id_and_one_created_per_completion(demo: Service) -> None:
    first, second = stream_chunks(demo, max_tokens=30), stream_chunks(demo, max_tokens=30)
    assert len(first) > 10
    assert len({chunk["id"] for chunk in first}) == 1 and len({chunk["created"] for chunk in first}) == 1
    assert first[0]["id"].startswith("chatcmpl-") and first[0]["id"] != "chatcmpl-demo"
    assert first[0]["id"] != second[0]["id"], "two completions share an id"


def test_n_choices_streamed_and_not(demo: Service) -> None:
    chunks = stream_chunks(demo, n=3, max_tokens=4)
    texts = {index: "" for index in range(3)}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert len(set(texts.values())) == 1 and texts[0].startswith("You asked")
    assert chunks[-1]["usage"]["completion_tokens"] == 3 * 4

    client = openai.OpenAI(base_url=f"{demo.base_url}/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(model="demo", messages=MESSAGES, n=2, max_tokens=4)
    assert [choice.index for choice in whole.choices] == [0, 1]
    assert whole.choices[0].message.content == whole.choices[1].message.content == texts[0]
    assert whole.id.startswith("chatcmpl-") and whole.id != "chatcmpl-demo"


@pytest.mark.parametrize("n", [0, 9, "2", 1.5, True])
def test_a_bad_n_is_a_clear_400(demo: Service, n: object) -> None:
    for stream in (True, False):
        response = httpx.post(f"{demo.base_url}/v1/chat/completions", json={"messages": MESSAGES, "n": n, "stream": stream}, timeout=10)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"


def test_metrics_are_open_without_client_keys(demo: Service) -> None:
    response = httpx.get(f"{demo.base_url}/metrics", timeout=10)
    assert response.status_code == 200 and "relay_requests_total" in response.text
