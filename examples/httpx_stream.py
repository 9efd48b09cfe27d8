"""Stream an answer with httpx, printing each piece as it arrives.

    SERVICE_URL=http://127.0.0.1:8000 SERVICE_KEY=... python examples/httpx_stream.py "Why stream?"
"""

from __future__ import annotations

import os
import sys

import httpx

url = os.environ.get("SERVICE_URL", "http://127.0.0.1:8000").rstrip("/")
key = os.environ.get("SERVICE_KEY")
prompt = " ".join(sys.argv[1:]) or "Why do answers stream?"
headers = {"Authorization": f"Bearer {key}"} if key else {}

# The read timeout is the longest silence allowed between two pieces, not a limit on the answer.
timeout = httpx.Timeout(300, connect=10)
with httpx.stream("POST", f"{url}/chat", json={"message": prompt}, headers=headers, timeout=timeout) as response:
    if response.is_error:
        response.read()
        sys.exit(f"HTTP {response.status_code}: {response.json()['error']['message']}")
    try:
        # iter_text() decodes incrementally: a character split between two reads comes out whole.
        for text in response.iter_text():
            print(text, end="", flush=True)
    except httpx.RemoteProtocolError:
        # The service leaves a failed plain-text answer unfinished, so a cut-off is an error here.
        sys.exit("\n[the answer was cut off]")
print()
