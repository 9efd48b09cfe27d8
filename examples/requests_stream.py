"""Stream an answer with requests, printing each piece as it arrives.

    SERVICE_URL=http://127.0.0.1:8000 SERVICE_KEY=... python examples/requests_stream.py "Why stream?"

Needs `pip install requests`.
"""

from __future__ import annotations

import os
import sys

import requests

url = os.environ.get("SERVICE_URL", "http://127.0.0.1:8000").rstrip("/")
key = os.environ.get("SERVICE_KEY")
prompt = " ".join(sys.argv[1:]) or "Why do answers stream?"
headers = {"Authorization": f"Bearer {key}"} if key else {}

# stream=True returns once the headers are in; without it requests reads the whole answer first.
# timeout=(connect, between reads): a silent connection fails instead of hanging forever.
with requests.post(f"{url}/chat", json={"message": prompt}, headers=headers, stream=True, timeout=(10, 300)) as response:
    if not response.ok:
        sys.exit(f"HTTP {response.status_code}: {response.json()['error']['message']}")
    try:
        # chunk_size=None yields whatever each network read brought. iter_lines() would hold the
        # text back until a newline, and a model's answer may have none for paragraphs.
        for text in response.iter_content(chunk_size=None, decode_unicode=True):
            print(text, end="", flush=True)
    except requests.exceptions.ChunkedEncodingError:
        # The service leaves a failed plain-text answer unfinished, so a cut-off is an error here.
        sys.exit("\n[the answer was cut off]")
print()
