"""Fuzz the service over raw sockets, and count what must never happen.

    python tests/fuzz.py                 # 12,000 requests, seed 1 (about a minute on 2 cores)
    python tests/fuzz.py --requests 2000 --seed 7

Starts the fake upstream (tests/upstream.py, answering every call normally) and the service
(`python service.py`, as users start it, REQUEST_TIMEOUT_SECONDS=2), then sends generated
requests from a pool of threads: valid requests with one to three fields broken (wrong types,
lone surrogates, non-string roles, huge numbers, unknown fields, bad keys, odd Accept and
Content-Type headers, keys in the URL), and malformed HTTP written to the socket (garbage,
broken request lines, bad or conflicting Content-Length and Transfer-Encoding, broken chunks,
bytes that are not Latin-1 or UTF-8, heads past MAX_HEADER_BYTES, requests cut short).

It prints, and exits non-zero unless all are zero:
- own 5xx: any 5xx but 503 (the upstream never fails here, so a 502 or 504 is the service's too);
- hangs: no complete response, and the connection still open, REQUEST_TIMEOUT_SECONDS + 3 s on;
- non-JSON 4xx: a 4xx whose body is not an OpenAI-shaped JSON error;
- log problems: a log line that is not JSON, a "status": 0, or a "Logging error".
Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import KEY, launch, upstream_env
from upstream import FakeUpstream

REQUEST_TIMEOUT = 2
HANG_SECONDS = REQUEST_TIMEOUT + 3
MAX_HEADER_BYTES = 8192
PATHS = ["/chat", "/v1/chat/completions", "/v1/responses", "/v1/models", "/healthz", "/", "/metrics", "/nope",
         "/v1/responses/resp_123", "/chat/", "//chat", "/v1/chat/completions?stream=1", "/%ff", "/chat%00",
         "/v1/responses/resp_1/cancel", "/v1/responses/resp_1/input_items", "/v1/models/fake-model", "/v1/models/%ed%a0%80",
         "/chat/streams/abc", "/chat/streams/abc?after=3", "/chat/streams/abc?after=-1", "/chat/streams/%ff?after=x"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW", "get"]
ROLES = ["user", "system", "assistant", "tool", "developer", "function", "wizard", "", "USER"]
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d"]


class Generator:
    """Random requests, reproducible from the seed."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def pick(self, items: list):  # type: ignore[no-untyped-def]
        return items[self.random.randrange(len(items))]

    def text(self) -> str:
        r = self.random.random()
        if r < 0.1:
            return self.pick(SURROGATES)
        if r < 0.15:
            return "x" * self.random.randrange(0, 5000)
        if r < 0.2:
            return "".join(chr(self.random.randrange(0x20, 0x3000)) for _ in range(self.random.randrange(1, 20)))
        return self.pick(["hi", "", " ", "Hello, world", "\u00e9\u00e8", "\U0001f600", "\x00", "null"])

    def value(self, depth: int = 0):  # type: ignore[no-untyped-def]
        r = self.random.random()
        if depth > 2 or r < 0.5:
            return self.pick([None, True, False, 0, -1, 1, 2.5, 10**30, -(10**20), 1e308, 3, "x", [], {}, self.text()])
        if r < 0.75:
            return [self.value(depth + 1) for _ in range(self.random.randrange(0, 4))]
        return {self.key(): self.value(depth + 1) for _ in range(self.random.randrange(0, 4))}

    def key(self) -> str:
        return self.pick(["role", "content", "model", "message", "messages", "input", "stream", "n", "tools", "x", ""] + SURROGATES)

    def message(self) -> dict:
        message = {"role": self.pick(ROLES), "content": self.text()}
        if self.random.random() < 0.2:
            message["role"] = self.value()
        if self.random.random() < 0.2:
            message["content"] = self.pick([self.value(), [{"type": "text", "text": self.text()}]])
        if self.random.random() < 0.1:
            message[self.key()] = self.value()
        return message

    def body(self, path: str) -> object:
        if self.random.random() < 0.05:
            return self.value()
        if path.startswith("/chat"):
            body: dict = {"message": self.text() if self.random.random() < 0.5 else "hi"}
            if self.random.random() < 0.3:
                body = {"messages": [self.message() for _ in range(self.random.randrange(0, 3))]}
        elif path.startswith("/v1/responses"):
            body = {"input": self.pick(["hi", self.text(), [self.message()]]), "model": "fake-model"}
        else:
            body = {"messages": [self.message() for _ in range(self.random.randrange(1, 3))], "stream": self.random.random() < 0.7}
        for _ in range(self.random.randrange(0, 3)):
            name = self.pick(["model", "temperature", "max_tokens", "stream", "stream_options", "max_continuations", "n",
                              "seed", "tools", self.key()])
            body[name] = self.value()
        return body

    def headers(self) -> dict[str, str]:
        headers = {"Host": "127.0.0.1"}
        if self.random.random() < 0.85:
            headers["Authorization"] = self.pick([f"Bearer {KEY}"] * 6 + ["Bearer wrong", "Basic x", "", f"bearer {KEY}"])
        if self.random.random() < 0.5:
            headers["Accept"] = self.pick(["text/event-stream", "application/x-ndjson", "text/plain", "*/*", "image/png",
                                           "text/event-stream;q=0", ";;,,", "application/*", "text/plain;q=nan"])
        if self.random.random() < 0.1:
            headers["X-Request-ID"] = self.pick(["abc", "x" * 300, "\u00e9", "a b"])
        if self.random.random() < 0.1:
            headers["Last-Event-ID"] = self.pick(["abc:3", "abc", ":", "abc:-1", "abc:x", "\u00e9:1", "a" * 500 + ":1", ""])
        return headers

    def http_request(self) -> bytes:
        """A well-formed HTTP request, with fuzzed content."""
        path = self.pick(PATHS)
        method = "GET" if self.random.random() < 0.2 else self.pick(["POST"] * 6 + METHODS)
        headers = self.headers()
        body = b""
        if method == "GET" and path.startswith("/chat") and self.random.random() < 0.7:
            query = [("q", self.pick(["hi", "", "%ff%fe", "%ed%a0%80", "x" * 5000, "%00"]))]
            for _ in range(self.random.randrange(0, 3)):
                query.append((self.pick(["model", "max_tokens", "temperature", "API_KEY", "apiKey", "api-key", "token",
                                         "Auth", "password", "x"]), self.pick(["1", "abc", "-1", "2.5", "nan", ""])))
            path += "?" + "&".join(f"{name}={value}" for name, value in query)
        elif method != "GET":
            content = json.dumps(self.body(path)).encode()  # lone surrogates leave as "\ud800" escapes
            if self.random.random() < 0.05:
                content = bytes(self.random.randrange(256) for _ in range(self.random.randrange(0, 64)))
            headers["Content-Type"] = self.pick(["application/json"] * 8 + ["text/plain", "", "application/json; charset=latin-1"])
            headers["Content-Length"] = str(len(content))
            body = content
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        return head.encode("utf-8", "surrogatepass") + body

    def malformed(self) -> bytes:
        """HTTP that a parser must refuse, or a request cut short."""
        valid = f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        body = b'{"message": "hi"}'
        choices = [
            lambda: bytes(self.random.randrange(256) for _ in range(self.random.randrange(1, 200))),
            lambda: b"GET\r\n\r\n",
            lambda: b"GET / HTTP/9.9\r\n\r\n",
            lambda: b"GET / FOO/1.1\r\n\r\n",
            lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            lambda: b"GET /healthz\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.0\r\n\r\n",
            lambda: b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\n: empty-name\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\nX-\x00: a\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\nX-A: \xff\xfe\x00\r\n\r\n",
            lambda: b"GET /he\xffalthz HTTP/1.1\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\n X-Folded: a\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
            lambda: (valid + "Content-Length: -1\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: abc\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: 1e3\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: 17\r\nContent-Length: 18\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: 99999999999999999999999\r\n\r\n").encode() + body,
            lambda: (valid + "Transfer-Encoding: chunked\r\nContent-Length: 17\r\n\r\n").encode() + b"11\r\n" + body + b"\r\n0\r\n\r\n",
            lambda: (valid + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            lambda: (valid + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\n" + body + b"\r\n0\r\n\r\n",
            lambda: (valid + "Transfer-Encoding: gzip\r\n\r\n").encode() + body,
            lambda: (valid + "Transfer-Encoding: chunked, chunked\r\n\r\n").encode() + b"11\r\n" + body + b"\r\n0\r\n\r\n",
            lambda: (valid + "Content-Length: 100\r\n\r\n").encode() + body,  # cut short: 408
            lambda: valid.encode(),  # the head never ends: 408
            lambda: b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n",
            lambda: b"GET /" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\n\r\n",
            lambda: b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
            lambda: (valid + "Content-Length: 17\r\nExpect: 100-continue\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: 17\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").encode() + body,
            lambda: (valid + "Content-Length: 17\r\n\r\n").encode() + body + b"GARBAGE\r\n\r\n",
        ]
        return self.pick(choices)()


def read_response(connection: socket.socket, deadline: float, head_only: bool) -> tuple[str, int | None, bytes]:
    """('answered', status, body), ('closed', None, b'') or ('hang', None, what came)."""
    received = b""
    status: int | None = None
    head_end = -1
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ("answered", status, received[head_end + 4 :]) if complete(received, head_end) else ("hang", status, received)
        connection.settimeout(remaining)
        try:
            data = connection.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        if not data:
            if head_end < 0:
                return ("closed", None, received)
            return ("answered", status, body_of(received[head_end + 4 :], received[:head_end]))
        received += data
        while head_end < 0 and received.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in received:
            received = received.partition(b"\r\n\r\n")[2]  # 100 Continue: the answer follows
        if head_end < 0:
            head_end = received.find(b"\r\n\r\n")
            if head_end >= 0:
                status = int(received.split(b" ", 2)[1])
        if head_end >= 0 and head_only:
            return ("answered", status, b"")
        if head_end >= 0 and complete(received, head_end):
            return ("answered", status, body_of(received[head_end + 4 :], received[:head_end]))


def complete(received: bytes, head_end: int) -> bool:
    if head_end < 0:
        return False
    head, body = received[:head_end].lower(), received[head_end + 4 :]
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    if b"transfer-encoding: chunked" in head:
        return body.endswith(b"0\r\n\r\n")
    return False


def body_of(body: bytes, head: bytes) -> bytes:
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    decoded, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        decoded, rest = decoded + rest[:size], rest[size + 2 :]
    return decoded


def is_openai_error(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def exchange(port: int, request: bytes) -> tuple[str, int | None, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS) as connection:
        try:
            connection.sendall(request)
        except OSError:
            pass  # refused mid-way (431, 400): the answer is still there to read
        return read_response(connection, time.monotonic() + HANG_SECONDS, head_only=request.startswith(b"HEAD "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=32)
    options = parser.parse_args()

    generator = Generator(options.seed)
    malformed = [generator.random.random() < 0.3 for _ in range(options.requests)]
    requests = [generator.malformed() if broken else generator.http_request() for broken in malformed]
    upstream = FakeUpstream().start()
    log_dir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    service = launch(log_dir, upstream_env(upstream, REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT), MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
                                           MAX_STREAMS="200", SHED_LAG_MS="0"))
    port = int(service.base_url.rsplit(":", 1)[1])
    statuses: Counter[int | str] = Counter()
    own_5xx, hangs, non_json_4xx, examples = 0, 0, 0, []
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(options.threads) as pool:
            for request, (kind, status, body) in zip(requests, pool.map(lambda r: exchange(port, r), requests)):
                statuses[status if kind == "answered" else kind] += 1
                bad = None
                if kind == "hang":
                    hangs, bad = hangs + 1, "hang"
                elif kind == "answered" and status is not None and status >= 500 and status != 503:
                    own_5xx, bad = own_5xx + 1, f"HTTP {status}"
                elif kind == "answered" and status is not None and 400 <= status < 500 and not request.startswith(b"HEAD ") and not is_openai_error(body):
                    non_json_4xx, bad = non_json_4xx + 1, f"HTTP {status}, not an OpenAI error"
                if bad and len(examples) < 10:
                    examples.append(f"{bad}: {request[:160]!r} -> {body[:160]!r}")
        seconds = time.monotonic() - started
        healthy = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[1] == 200
    finally:
        service.stop()
        upstream.stop()

    log = service.log()
    lines = [line for line in log.splitlines() if line.startswith("{")]
    not_json = sum(1 for line in lines if not parses(line))
    status_zero = sum(1 for line in lines if parses(line) and json.loads(line).get("status") == 0)
    logging_errors = log.count("--- Logging error ---") + log.count("Traceback")
    print(f"{len(requests)} requests ({sum(malformed)} of them malformed HTTP or cut short) "
          f"in {seconds:.0f} s with {options.threads} threads, seed {options.seed}")
    print("responses: " + ", ".join(f"{key}: {count}" for key, count in sorted(statuses.items(), key=lambda item: str(item[0]))))
    print(f"own 5xx: {own_5xx}")
    print(f"hangs: {hangs}")
    print(f"non-JSON 4xx: {non_json_4xx}")
    print(f"log lines: {len(lines)}; not JSON: {not_json}; status 0: {status_zero}; logging errors or tracebacks: {logging_errors}")
    print(f"healthy afterwards: {healthy}")
    for example in examples:
        print("  " + example)
    passed = own_5xx == hangs == non_json_4xx == not_json == status_zero == logging_errors == 0 and healthy
    if passed:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f"the service's log: {service.log_path}")
    return 0 if passed else 1


def parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
