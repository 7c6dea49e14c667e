"""Request bodies of the public API, parsed and validated at the boundary.

What a client sends is refused with a 400 before anything runs or is stored when it is
not JSON (`parse_json`: malformed, not UTF-8, nested too deeply), or when a string in it
holds text no store keeps as sent (`ClientBody`: NUL, a lone surrogate).

The bodies that clients of the prompt router chatfleet replaces still send (generate,
classify, compress, select) accept fields chatfleet has no use for and ignore them;
`SelectRequest` also takes that router's camelCase spellings.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from chatfleet.serving.protocol import Message

#: The largest ``offset`` of a listing: far past any store's rows, and far inside the
#: 64-bit integers SQL's OFFSET takes (past 2**63 - 1 PostgreSQL and SQLite fail).
MAX_OFFSET = 1_000_000_000
MAX_PAGE = 500
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="How many to return.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="How many to skip.")]
_INT64 = 2**63


def parse_json(raw: str | bytes) -> Any:
    """A client's JSON document; `json.JSONDecodeError` for anything that is not one.

    `json.loads` raises `RecursionError` (not a `ValueError`) for 100,000 nested
    ``[``, and `UnicodeDecodeError` for bytes that are not UTF-8: both are the
    client's mistake, reported like any malformed JSON.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        doc = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8"
        raise json.JSONDecodeError(reason, doc, 0) from None


def check_text(value: str) -> str:
    """``value`` if every store keeps it as sent; else `ValueError`.

    PostgreSQL refuses NUL in text (SQLite would keep it), and a lone surrogate
    (``"\\ud800"`` sent as a JSON escape) cannot be encoded as UTF-8 at all.
    """
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "must be valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)"
        ) from None
    return value


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    # Nested bodies are ClientBody too: they check their own fields (precise locations).


class ClientBody(BaseModel):
    """A request body, or a part of one: no string in it may hold NUL or a lone surrogate."""

    @field_validator("*", mode="wrap")
    @classmethod
    def _storable_text(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, str):
            check_text(value)  # before a length constraint says something vaguer
        validated = handler(value)
        _check_strings(validated)
        return validated


class ContentPart(ClientBody):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Part type; only 'text' parts are read.")
    text: str | None = Field(None, description="The text of a 'text' part.")


class ChatMessage(ClientBody):
    """An OpenAI chat message (string or list-of-parts content)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _storable_content(cls, value: Any) -> Any:
        # Before the union is tried: a bad part is then one error naming this field,
        # not one per member of the union.
        _check_strings(value)
        return value

    def to_message(self) -> Message:
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text)


class StreamOptions(ClientBody):
    include_usage: bool = False


class SamplingFields(ClientBody):
    max_tokens: int | None = Field(None, ge=1, description="Answer length cap.")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop sequences.")
    seed: int | None = Field(
        None,
        ge=-_INT64,
        lt=_INT64,
        description="Sampling seed (a 64-bit integer), where the engine supports it.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`; fields the server doesn't use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="A served model's name.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")

    def conversation_id(self) -> str | None:
        """A chatfleet extension: routes of one conversation stick together."""
        value = (self.model_extra or {}).get("conversation_id")
        return str(value) if value else None

    @model_validator(mode="after")
    def _alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class GenerateRequest(SamplingFields):
    """`POST /api/generate`: a prompt or a message list, streamed back as SSE."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model name; empty means the default model.")
    prompt: str | None = Field(None, min_length=1, description="A single user prompt.")
    system: str | None = Field(None, description="An optional system prompt.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A conversation, instead of prompt."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def to_messages(self) -> list[Message]:
        out: list[Message] = []
        if self.system:
            out.append(Message(role="system", content=self.system))
        if self.prompt is not None:
            out.append(Message(role="user", content=self.prompt))
        else:
            assert self.messages is not None
            out.extend(m.to_message() for m in self.messages)
        return out


MAX_CATEGORIES = 64


def checked_categories(value: list[str]) -> list[str]:
    """Category names without surrounding blanks; none empty or repeated, at most 64."""
    names = [v.strip() for v in value]
    if any(not n for n in names):
        raise ValueError("categories must not be empty strings")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate categories: {', '.join(duplicates)}")
    if len(names) > MAX_CATEGORIES:
        raise ValueError(f"at most {MAX_CATEGORIES} categories")
    return names


class ClassifyRequest(ClientBody):
    """`POST /api/classify`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="The text to classify.")
    possible_categories: list[str] | None = Field(
        None, description="Labels to score; empty means the configured categories."
    )
    descriptions: dict[str, str] | None = Field(
        None, description="Optional label descriptions, compared along with the names."
    )
    multi_label: bool = Field(False, description="Score labels independently.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("possible_categories")
    @classmethod
    def _categories(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one category, or leave the field out")
        return checked_categories(value)


class CompressRequest(ClientBody):
    """`POST /api/compress`."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, description="The context to compress.")
    question: str = Field("", description="A question kept verbatim; guides what is kept.")
    ratio: float | None = Field(
        None, gt=0, le=1, description="Fraction of tokens to keep; empty: the configured one."
    )


class SelectRequest(SamplingFields):
    """`POST /api/models/select`: route a prompt, then stream the answer.

    The prompt router's clients send ``topP``, ``maxTokens`` and ``possibleCategories``
    (camelCase): each spelling works, and fields chatfleet does not use are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("max_tokens", "maxTokens"),
        description="Answer length cap (or `maxTokens`).",
    )
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        validation_alias=AliasChoices("top_p", "topP"),
        description="Nucleus sampling mass (or `topP`).",
    )
    prompt: str | None = Field(None, min_length=1, description="A single user prompt.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A conversation, instead of prompt."
    )
    conversation_id: str | None = Field(
        None, max_length=200, description="Keeps a conversation on its model (hysteresis)."
    )
    possible_categories: list[str] | None = Field(
        None,
        validation_alias=AliasChoices("possible_categories", "possibleCategories"),
        description="Route among these categories only (or `possibleCategories`): the prompt"
        " is classified over them, and the best one's route answers, whatever its"
        " confidence (an unrouted one: the default model). Empty: every configured category.",
    )

    @field_validator("possible_categories")
    @classmethod
    def _categories(cls, value: list[str] | None) -> list[str] | None:
        # The prompt router's clients send an empty list for "no restriction".
        return checked_categories(value) if value else None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> SelectRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        return self

    def to_messages(self) -> list[Message]:
        if self.prompt is not None:
            return [Message(role="user", content=self.prompt)]
        assert self.messages is not None
        return [m.to_message() for m in self.messages]


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
