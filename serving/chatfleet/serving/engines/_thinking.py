"""Split streamed text into reasoning and answer at ``<think>`` tags."""

from __future__ import annotations

from chatfleet.serving.protocol import ChunkKind

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class ThinkSplitter:
    """Incremental parser: feed text pieces, get ``(kind, text)`` parts back.

    Tags may be split across pieces; a partial tag at the end of a piece is held
    back until the next piece decides it. Text outside tags is the answer.
    """

    def __init__(self, *, start_in_thinking: bool = False) -> None:
        self._thinking = start_in_thinking
        self._held = ""

    def feed(self, piece: str) -> list[tuple[ChunkKind, str]]:
        text = self._held + piece
        self._held = ""
        parts: list[tuple[ChunkKind, str]] = []
        while text:
            tag = CLOSE_TAG if self._thinking else OPEN_TAG
            at = text.find(tag)
            if at >= 0:
                if at:
                    parts.append((self._kind, text[:at]))
                text = text[at + len(tag) :]
                self._thinking = not self._thinking
                continue
            keep = _partial_suffix(text, tag)
            if keep:
                self._held = text[-keep:]
                text = text[:-keep]
            if text:
                parts.append((self._kind, text))
            break
        return parts

    def flush(self) -> list[tuple[ChunkKind, str]]:
        held, self._held = self._held, ""
        return [(self._kind, held)] if held else []

    @property
    def _kind(self) -> ChunkKind:
        return "thinking" if self._thinking else "text"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
