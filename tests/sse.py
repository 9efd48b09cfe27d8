"""Reading Server-Sent Events in tests, as a client does."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) pairs from SSE lines, as they arrive; comments are skipped."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def whole_sse_events(text: str) -> list[tuple[str, str]]:
    """The events of a complete SSE body, which must end where an event ends."""
    assert text == "" or text.endswith("\n\n"), f"the SSE body ends mid-event: {text[-80:]!r}"
    return list(sse_events(text.split("\n")))
