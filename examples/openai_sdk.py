"""Stream an answer with the official openai SDK, through the service's /v1 API.

    SERVICE_URL=http://127.0.0.1:8000 SERVICE_KEY=... python examples/openai_sdk.py "Why stream?"
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import openai

url = os.environ.get("SERVICE_URL", "http://127.0.0.1:8000").rstrip("/")
prompt = " ".join(sys.argv[1:]) or "Why do answers stream?"

# The SDK insists on a model name; /healthz tells which one the service uses by default.
with urllib.request.urlopen(f"{url}/healthz", timeout=10) as health:
    model = os.environ.get("SERVICE_MODEL") or json.load(health)["model"]

# The SDK always sends a key; any non-empty value does when the service needs none.
client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("SERVICE_KEY") or "none", max_retries=0)
try:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},  # a last chunk with the token counts
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens]", file=sys.stderr)
except openai.APIError as error:  # an HTTP error, or an error event in the middle of the stream
    sys.exit(f"\n[error: {error.message}]")
print()
