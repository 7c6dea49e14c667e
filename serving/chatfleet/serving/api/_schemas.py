"""Request bodies of the public API, parsed and validated at the boundary.

What a client sends is refused with a 400 before anything runs or is stored when it is
not JSON (`parse_json`: malformed, not UTF-8, nested too deeply), or when a string in it
holds text no store keeps as sent (`ClientBody`: NUL, a lone surrogate).

The bodies that clients of the prompt router chatfleet replaces still send (generate;
classify, compress and select in `_routing_schemas`) accept fields chatfleet has no use
for and ignore them. The sampling fields are
strict, as OpenAI's are: ``"top_p": true`` or ``"seed": false`` is a 400, not a 1.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NamedTuple

from fastapi import Query
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from chatfleet.serving.protocol import Message, ToolCall

#: Seeds are integers JSON carries exactly (JavaScript's safe integers): a larger one
#: arrives as a float that no longer says which integer was meant.
MAX_SEED = 2**53 - 1
#: The largest ``offset`` of a listing: far past any store's rows, and far inside the
#: 64-bit integers SQL's OFFSET takes (past 2**63 - 1 PostgreSQL and SQLite fail).
MAX_OFFSET = 1_000_000_000
MAX_PAGE = 500
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="How many to return.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="How many to skip.")]


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


class _Opaque:
    """Marks a field of free-form JSON that is neither stored nor sent to an engine."""


#: ``Annotated[dict[str, Any], OPAQUE]``: its strings are not held to `check_text`.
OPAQUE = _Opaque()


class ClientBody(BaseModel):
    """A request body, or a part of one: no string in it may hold NUL or a lone surrogate.

    Its integer fields are strict (``"seed": false`` or ``"5"`` is a 400, as in OpenAI's
    API) yet take ``3.0``, which JSON (and JSON Schema's "integer") holds to be 3.
    """

    @field_validator("*", mode="wrap")
    @classmethod
    def _storable_text(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        if info.field_name and OPAQUE in cls.model_fields[info.field_name].metadata:
            return handler(value)
        if isinstance(value, str):
            check_text(value)  # before a length constraint says something vaguer
        elif isinstance(value, float) and value.is_integer():
            value = int(value)  # a strict float field takes it back; a strict int one needs it
        validated = handler(value)
        _check_strings(validated)
        return validated


class ContentPart(ClientBody):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Part type; only 'text' parts are read.")
    text: str | None = Field(None, description="The text of a 'text' part.")


class FunctionCallBody(ClientBody):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="The function called.")
    arguments: str = Field(description="Its arguments, a JSON text (as the model wrote it).")


class ToolCallBody(ClientBody):
    """A tool call an assistant made, as OpenAI's API shows it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="The call's id.")
    type: Literal["function"] = Field("function", description="Only function calls exist.")
    function: FunctionCallBody = Field(description="What was called, with what.")

    def to_call(self) -> ToolCall:
        return ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


class ChatMessage(ClientBody):
    """An OpenAI chat message (string or list-of-parts content)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, description="A participant's name; engines do not use it.")
    tool_calls: list[ToolCallBody] | None = Field(
        None, description="An assistant's tool calls (needs an engine with tools)."
    )
    tool_call_id: str | None = Field(
        None, description="The call a tool message answers (needs an engine with tools)."
    )

    def asks_for_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls) or self.tool_call_id is not None

    def asks_for_vision(self) -> bool:
        return isinstance(self.content, list) and any(p.type != "text" for p in self.content)

    @field_validator("content", mode="before")
    @classmethod
    def _storable_content(cls, value: Any) -> Any:
        # Before the union is tried: a bad part is then one error naming this field,
        # not one per member of the union. Only the text is read: a part's other
        # fields go nowhere (a non-text part is refused or dropped before them).
        if isinstance(value, str):
            check_text(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, dict):
                    _check_strings([part.get("type"), part.get("text")])
        return value

    def to_message(self) -> Message:
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        calls = tuple(c.to_call() for c in self.tool_calls or ())
        return Message(role=role, content=text, tool_calls=calls, tool_call_id=self.tool_call_id)


def _at_most_4_items(schema: dict[str, Any]) -> None:
    # The validator below says it in a clearer message than a union's member errors.
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = 4


class Ask(NamedTuple):
    """Something a request asks of the model's engine: refused when it lacks ``capability``.

    ``capability`` names a flag of `EngineCapabilities`; any other name (``n``,
    ``logit_bias``...) is a feature no engine here has, so it is always refused.
    """

    param: str
    capability: str
    what: str


class SamplingFields(ClientBody):
    max_tokens: int | None = Field(None, ge=1, strict=True, description="Answer length cap.")
    temperature: float | None = Field(
        None, ge=0, le=2, strict=True, description="Sampling temperature."
    )
    top_p: float | None = Field(None, gt=0, le=1, strict=True, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 stop sequences.", json_schema_extra=_at_most_4_items
    )
    seed: int | None = Field(
        None,
        ge=-MAX_SEED,
        le=MAX_SEED,
        strict=True,
        description="Sampling seed, |seed| < 2**53 (what JSON carries exactly).",
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

    def asks(self) -> list[Ask]:
        """What the model's engine must be able to do for this request (`Ask`)."""
        asks = []
        if self.stop_list():
            asks.append(Ask("stop", "stop", "stop sequences"))
        if self.seed is not None:
            asks.append(Ask("seed", "seed", "seed"))
        return asks

    def sampling_extras(self) -> dict[str, int | float]:
        """Sampling parameters beyond the common ones, for engines that declare them."""
        return {}

    def tooling(self) -> dict[str, Any]:
        """`GenerationRequest`'s tool and output-format fields this request sets."""
        return {}


def prompt_or_messages_schema(schema: dict[str, Any]) -> None:
    # The document says what the validators check: exactly one of the two, never null.
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]
    for name in ("prompt", "messages"):
        field = schema["properties"][name]
        field.pop("default", None)
        field.update(next(b for b in field.pop("anyOf") if b.get("type") != "null"))


class PromptOrMessages(SamplingFields):
    @field_validator("prompt", "messages", mode="before", check_fields=False)
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null: leave the field out")
        return value


class GenerateRequest(PromptOrMessages):
    """`POST /api/generate`: a prompt or a message list, streamed back as SSE."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=prompt_or_messages_schema)

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


#: Text as `check_text` takes it (NUL refused), in the OpenAPI document's words; the
#: document adds it to every request string (lone surrogates JSON Schema cannot say).
TEXT_PATTERN = r"^[^\x00]*$"


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, written for the client.")
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="A stable machine-readable code (see the error tree).")


class ErrorResponse(BaseModel):
    """Every error body: OpenAI's shape."""

    error: ErrorDetail


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape (`ErrorResponse`)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
