"""Stream an answer with the openai SDK's Responses API (the API the AI SDK, the Agents SDK and
Codex use), through the service; the model comes from the service's /v1/models.

    SERVICE_URL=http://127.0.0.1:8000 SERVICE_KEY=... python examples/openai_responses.py "Why stream?"
"""

from __future__ import annotations

import os
import sys

import openai

url = os.environ.get("SERVICE_URL", "http://127.0.0.1:8000").rstrip("/")
prompt = " ".join(sys.argv[1:]) or "Why do answers stream?"

# The SDK always sends a key; any non-empty value does when the service needs none.
client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("SERVICE_KEY") or "none", max_retries=0)
try:
    model = os.environ.get("SERVICE_MODEL") or next(iter(client.models.list())).id
    with client.responses.stream(model=model, input=prompt) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "error":  # the stream failed after it started
                sys.exit(f"\n[error: {event.message}]")
        usage = stream.get_final_response().usage
    if usage is not None:
        print(f"\n[{usage.output_tokens} tokens]", file=sys.stderr)
except openai.APIError as error:  # an HTTP error before the stream started
    sys.exit(f"\n[error: {error.message}]")
print()
