"""What the upstream said for one /chat answer, over all its rounds: the text, how it ended, what
it cost, and the seamless join of a continuation (MAX_CONTINUATIONS) to the text before it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.errors import StreamFailure
from relay.events import DONE, parse_chunk

CONTINUE_INSTRUCTION = (
    "Your previous message was cut off by the output limit. Continue exactly where it stopped, "
    "mid-word or mid-sentence if need be. Do not repeat any of it, and add no preamble."
)
SEAM_CHARS = 48  # how much of a continuation is held back to find text it repeats at the join


def _sum_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return total
    if total is None:
        return dict(usage)
    summed = dict(total)
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(name), int):
            summed[name] = int(summed.get(name) or 0) + usage[name]
    if usage.get("estimated"):
        summed["estimated"] = True
    return summed


def _join(before: str, after: str) -> str:
    """`after` without what it repeats of the end of `before`, and without doubled whitespace.

    Models asked to continue often restate the last words, or start with a space the text already
    ends with; the reader must see one seamless text.
    """
    if before[-1:].isspace():
        after = after.lstrip(" ")
    for size in range(min(len(before), len(after)), 7, -1):  # overlaps under 8 characters are chance
        if before.endswith(after[:size]):
            return after[size:]
    return after


@dataclass
class Transcript:
    """What the upstream said for one /chat answer, over all its rounds: the text of choice 0,
    how the last round ended, and the usage of every round summed.

    A round the upstream sent no usage for (llama.cpp ignores include_usage, and no upstream sends
    it for an answer that ended early: client gone, failure, shutdown) counts the pieces it relayed
    as its completion tokens, marked `"estimated": true`, so an operator can still tell what an
    answer cost. Usage from the upstream always wins."""

    text: str = ""
    finish_reason: str | None = None
    ended: bool = False  # this round's [DONE] was seen
    usage: dict[str, Any] | None = None
    refusal: str = ""
    continuations: int = 0
    failure: StreamFailure | None = None
    _round_usage: dict[str, Any] | None = None
    _round_pieces: int = 0
    _seam: str | None = None  # a continuation's first text, held until the join is clear

    def read(self, payloads: list[bytes]) -> list[str]:
        """The text deltas in `payloads` to send, in order; records finish reason and usage. An
        event that is not a chunk stops the reading and is kept as `failure`, to be raised once
        the text before it was sent."""
        texts = []
        for payload in payloads:
            if payload == DONE:
                self.ended = True
                break
            try:
                chunk = parse_chunk(payload)
            except StreamFailure as failure:
                self.failure = failure
                break
            if isinstance(chunk.get("usage"), dict):
                self._round_usage = chunk["usage"]  # some servers send running totals on every chunk
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str) and delta["content"]:
                    texts.append(delta["content"])
                    self._round_pieces += 1
                if isinstance(delta.get("refusal"), str):
                    self.refusal += delta["refusal"]
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        if self._seam is not None:
            self._seam += "".join(texts)
            if len(self._seam) < SEAM_CHARS and self.failure is None:
                return []
            texts, self._seam = [_join(self.text, self._seam)], None
        self.text += "".join(texts)
        return texts

    def end_round(self) -> list[str]:
        """Close the round: count its usage, and release text still held at a seam."""
        relayed = {"completion_tokens": self._round_pieces, "estimated": True}
        self.usage = _sum_usage(self.usage, relayed if self._round_usage is None else self._round_usage)
        self._round_usage, self._round_pieces = None, 0
        if self._seam is None:
            return []
        rest, self._seam = _join(self.text, self._seam), None
        self.text += rest
        return [rest] if rest else []

    def continuation(self, body: dict[str, Any]) -> dict[str, Any]:
        """The next round's request: the conversation, the answer so far, and a request to go on."""
        self.continuations += 1
        self.finish_reason, self.ended, self._seam = None, False, ""
        answer_so_far = {"role": "assistant", "content": self.text}
        return {**body, "messages": [*body["messages"], answer_so_far, {"role": "user", "content": CONTINUE_INSTRUCTION}]}

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"finish_reason": self.finish_reason, "usage": self.usage, "continuations": self.continuations}
        if self.refusal:
            summary["refusal"] = self.refusal
        return summary

