"""The routing endpoints' bodies: classify, compress, select a model.

The prompt router chatfleet replaces had clients that still send these: fields
chatfleet has no use for are ignored, and `SelectRequest` also takes that router's
camelCase spellings (``topP``, ``maxTokens``, ``possibleCategories``).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from chatfleet.serving.api._schemas import (
    ChatMessage,
    ClientBody,
    PromptOrMessages,
    prompt_or_messages_schema,
)
from chatfleet.serving.protocol import Message

__all__ = ["ClassifyRequest", "CompressRequest", "SelectRequest", "checked_categories"]

MAX_CATEGORIES = 64
#: Text with something besides blanks in it (and no NUL), as the OpenAPI document says
#: it: Python's blanks spelled out, as a regex's ``\s`` differs between Python and
#: JavaScript, and the server strips with Python's ``str.strip``.
_BLANK = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NOT_BLANK = rf"^[^\x00]*[^\x00{_BLANK}][^\x00]*$"


def _categories_schema(schema: dict[str, Any], *, min_items: int = 0) -> None:
    # What `checked_categories` checks, said in the document.
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "array":
            branch["items"] = {"type": "string", "pattern": _NOT_BLANK}
            branch.update(minItems=min_items, maxItems=MAX_CATEGORIES, uniqueItems=True)


def _some_categories_schema(schema: dict[str, Any]) -> None:
    _categories_schema(schema, min_items=1)


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

    prompt: str = Field(
        description="The text to classify.", json_schema_extra={"pattern": _NOT_BLANK}
    )
    possible_categories: list[str] | None = Field(
        None,
        description="Labels to score; empty means the configured categories.",
        json_schema_extra=_some_categories_schema,
    )
    descriptions: dict[str, str] | None = Field(
        None, description="Optional label descriptions, compared along with the names."
    )
    multi_label: bool = Field(False, strict=True, description="Score labels independently.")

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
        None,
        gt=0,
        le=1,
        strict=True,
        description="Fraction of tokens to keep; empty: the configured one.",
    )


#: The prompt router's camelCase spellings `SelectRequest` takes, and the field each is.
_CAMEL_CASE = {
    "maxTokens": "max_tokens",
    "topP": "top_p",
    "possibleCategories": "possible_categories",
}


def _select_schema(schema: dict[str, Any]) -> None:
    prompt_or_messages_schema(schema)
    # The document says each spelling is checked as its field is: else it allowed
    # `{"topP": {}}` as an unknown (ignored) property, which the server refuses.
    for camel, snake in _CAMEL_CASE.items():
        field = schema["properties"][snake]
        schema["properties"][camel] = {**field, "title": camel}
    # One spelling of a field at a time (`_one_spelling`).
    schema["allOf"] = [{"not": {"required": [s, c]}} for c, s in _CAMEL_CASE.items()]


class SelectRequest(PromptOrMessages):
    """`POST /api/models/select`: route a prompt, then stream the answer.

    The prompt router's clients send ``topP``, ``maxTokens`` and ``possibleCategories``
    (camelCase): each spelling works, and fields chatfleet does not use are ignored.
    """

    model_config = ConfigDict(extra="ignore", json_schema_extra=_select_schema)

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
    prompt: str | None = Field(
        None,
        min_length=1,
        description="A single user prompt.",
        json_schema_extra={"pattern": _NOT_BLANK},
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A conversation, instead of prompt."
    )
    conversation_id: str | None = Field(
        None, max_length=200, description="Keeps a conversation on its model (hysteresis)."
    )
    possible_categories: list[str] | None = Field(
        None,
        validation_alias=AliasChoices("possible_categories", "possibleCategories"),
        json_schema_extra=_categories_schema,
        description="Route among these categories only (or `possibleCategories`): the prompt"
        " is classified over them, and the best one's route answers, whatever its"
        " confidence (an unrouted one: the default model). Empty: every configured category.",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        # Both would leave one unchecked (the first present wins): say which to keep.
        if isinstance(data, dict):
            for camel, snake in _CAMEL_CASE.items():
                if camel in data and snake in data:
                    raise ValueError(f"give {snake} or {camel}, not both")
        return data

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
