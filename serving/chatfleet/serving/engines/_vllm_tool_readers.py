"""Tool calls read out of an answer while it streams from vLLM (see `_vllm_tools`).

One reader per answer: a named call's arguments are the whole answer; ``required``'s
answer is vLLM's JSON array of calls, read as it comes; ``auto``'s is the model's own
format, read by vLLM's tool parser.
"""

from __future__ import annotations

import json
from typing import Any

from chatfleet.serving.errors import EngineError
from chatfleet.serving.protocol import GenerationRequest, ToolCallDelta

__all__ = ["NamedCallReader", "ParserReader", "Piece", "RequiredCallsReader", "ToolReader"]

#: What a reader hands on: answer text, or a piece of a tool call.
Piece = str | ToolCallDelta


class ToolReader:
    """Reads the tool calls out of one answer as its text streams (one per request).

    `feed` takes each new piece of answer text (and its token ids), `finish` ends the
    answer; both return what to stream: text, or pieces of calls in OpenAI's order
    (a call's first piece carries its id and name).
    """

    def __init__(self, request: GenerationRequest) -> None:
        self._request_id = request.request_id
        self._first_only = request.parallel_tool_calls is False
        #: Whether a call was made (the answer then finishes with "tool_calls").
        self.called = False

    def feed(self, text: str, token_ids: list[int]) -> list[Piece]:
        try:
            return self._kept(self._read(text, token_ids))
        except Exception as exc:
            raise self._failed(exc) from exc

    def finish(self) -> list[Piece]:
        try:
            return self._kept(self._end())
        except Exception as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> EngineError:
        # The model's answer broke the reader (or vLLM's parser), not the client's request.
        return EngineError(f"reading the tool calls failed: {type(exc).__name__}: {exc}")

    def _read(self, text: str, token_ids: list[int]) -> list[Piece]:
        raise NotImplementedError

    def _end(self) -> list[Piece]:
        return []

    def _call_id(self, index: int) -> str:
        return f"call_{self._request_id[:16]}_{index}"

    def _kept(self, pieces: list[Piece]) -> list[Piece]:
        kept = [
            p
            for p in pieces
            if not (isinstance(p, ToolCallDelta) and self._first_only and p.index != 0)
        ]
        self.called = self.called or any(isinstance(p, ToolCallDelta) for p in kept)
        return kept

    @staticmethod
    def for_request(request: GenerationRequest, parser: Any) -> ToolReader | None:
        """The reader of ``request``'s answer; None when it is plain text.

        ``parser``: a `ParserReader` factory (``parser(request)``) for ``auto``.
        """
        choice = request.tool_choice
        if not request.tools or choice == "none":
            return None
        if isinstance(choice, dict):
            return NamedCallReader(request, choice["function"]["name"])
        if choice == "required":
            return RequiredCallsReader(request)
        reader: ToolReader = parser(request)
        return reader


class NamedCallReader(ToolReader):
    """A named tool choice: the whole answer is the call's arguments."""

    def __init__(self, request: GenerationRequest, name: str) -> None:
        super().__init__(request)
        self._name = name
        self._named = False

    def _read(self, text: str, token_ids: list[int]) -> list[Piece]:
        if self._named:
            return [ToolCallDelta(0, text)] if text else []
        self._named = True
        return [ToolCallDelta(0, text, self._call_id(0), self._name)]


_KEY, _COLON, _VALUE, _AFTER = range(4)


class RequiredCallsReader(ToolReader):
    """``tool_choice: required``: the answer is ``[{"name": ..., "parameters": {...}}, ...]``.

    One pass over each new piece of text, aware of strings and nesting, interpreting
    only the level of the array's items: an item's call is named once its ``name`` is
    whole, then the text of its ``parameters`` is passed on as it comes.
    """

    def __init__(self, request: GenerationRequest) -> None:
        super().__init__(request)
        self._depth = 0  # of {} and []: an item's keys sit at 2
        self._in_string = False
        self._escaped = False
        self._ended = False  # past the array's closing bracket
        self._item = -1
        self._expect = _KEY
        self._key: str | None = None
        self._capture: list[str] | None = None  # a key or a name being read
        self._in_args = False
        self._scalar_args = False
        self._names: dict[int, str] = {}
        self._args: dict[int, list[str]] = {}
        self._sent: dict[int, int] = {}  # pieces of arguments passed on, per item

    def _read(self, text: str, token_ids: list[int]) -> list[Piece]:
        for ch in text:
            if self._ended:
                break
            if self._in_string:
                self._string_char(ch)
            elif not (self._in_args and self._args_char(ch)):
                self._structure_char(ch)
        return self._news()

    def _string_char(self, ch: str) -> None:
        if self._in_args:
            self._args[self._item].append(ch)
        elif self._capture is not None:
            self._capture.append(ch)
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            if self._in_args and self._depth == 2:
                self._in_args = False  # parameters was a string
                self._expect = _AFTER
            elif self._capture is not None:
                self._captured(json.loads("".join(self._capture)))

    def _captured(self, value: Any) -> None:
        self._capture = None
        if self._expect == _KEY:
            self._key, self._expect = value, _COLON
        else:
            self._names.setdefault(self._item, value)
            self._expect = _AFTER

    def _args_char(self, ch: str) -> bool:
        """Take a character of the parameters' value; False when it ended before ``ch``."""
        if self._scalar_args and self._depth == 2 and (ch in ",}]" or ch.isspace()):
            self._in_args = False
            self._expect = _AFTER
            return False
        self._args[self._item].append(ch)
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 2:
                self._in_args = False
                self._expect = _AFTER
        return True

    def _structure_char(self, ch: str) -> None:
        at_item = self._depth == 2
        if ch == '"':
            self._in_string = True
            if at_item and self._expect == _KEY:
                self._capture = [ch]
            elif at_item and self._expect == _VALUE:
                self._value_starts(ch)
        elif ch in "{[":
            if (self._depth == 0 and ch != "[") or (self._depth == 1 and ch != "{"):
                self._ended = True  # not the array of calls the schema holds it to
                return
            if self._depth == 1:
                self._item += 1
                self._expect, self._key = _KEY, None
            elif at_item and self._expect == _VALUE:
                self._value_starts(ch)
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self._ended = self._depth <= 0
        elif at_item:
            if ch == ":" and self._expect == _COLON:
                self._expect = _VALUE
            elif ch == ",":
                self._expect, self._key = _KEY, None
            elif not ch.isspace() and self._expect == _VALUE:
                self._value_starts(ch)

    def _value_starts(self, ch: str) -> None:
        if self._key == "parameters":
            self._in_args, self._scalar_args = True, ch not in '"{['
            self._args.setdefault(self._item, []).append(ch)
        elif self._key == "name" and ch == '"':
            self._capture = [ch]
        else:
            self._expect = _AFTER  # another key's value: read past, not interpreted

    def _news(self) -> list[Piece]:
        pieces: list[Piece] = []
        for item, name in sorted(self._names.items()):
            args = self._args.get(item, [])
            sent = self._sent.get(item)
            if sent is None:
                if item not in self._args:
                    continue  # named, but its arguments have not begun
                pieces.append(ToolCallDelta(item, "".join(args), self._call_id(item), name))
            elif len(args) > sent:
                pieces.append(ToolCallDelta(item, "".join(args[sent:])))
            self._sent[item] = len(args)
        return pieces

    def _end(self) -> list[Piece]:
        # A call whose parameters never came (cut by max_tokens) is still named.
        return [
            ToolCallDelta(item, "", self._call_id(item), name)
            for item, name in sorted(self._names.items())
            if item not in self._sent
        ]


class ParserReader(ToolReader):
    """``tool_choice: auto``: vLLM's tool parser reads the model's own call format."""

    def __init__(self, request: GenerationRequest, parser: Any, chat_request: Any) -> None:
        super().__init__(request)
        self._parser = parser
        self._chat_request = chat_request
        self._text = ""
        self._token_ids: list[int] = []
        self._named: set[int] = set()
        self._held: dict[int, str] = {}  # arguments of a call not named yet
        self._last = -1

    def _read(self, text: str, token_ids: list[int]) -> list[Piece]:
        previous_text, previous_ids = self._text, self._token_ids
        self._text, self._token_ids = previous_text + text, previous_ids + token_ids
        delta = self._parser.extract_tool_calls_streaming(
            previous_text,
            self._text,
            text,
            previous_ids,
            self._token_ids,
            token_ids,
            self._chat_request,
        )
        if delta is None:
            return []
        pieces: list[Piece] = [delta.content] if delta.content else []
        for call in delta.tool_calls or ():
            pieces += self._call_pieces(call)
        return pieces

    def _call_pieces(self, call: Any) -> list[Piece]:
        index = call.index
        function = call.function
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None) or ""
        if index in self._named:
            return [ToolCallDelta(index, arguments)] if arguments else []
        if not name:
            self._held[index] = self._held.get(index, "") + arguments
            return []
        self._named.add(index)
        self._last = max(self._last, index)
        arguments = self._held.pop(index, "") + arguments
        return [ToolCallDelta(index, arguments, call.id or self._call_id(index), name)]

    def _end(self) -> list[Piece]:
        remaining = getattr(self._parser, "get_remaining_unstreamed_args", None)
        if self._last < 0 or remaining is None:
            return []
        rest: str = remaining()
        return [ToolCallDelta(self._last, rest)] if rest else []
