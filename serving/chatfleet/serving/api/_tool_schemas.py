"""Tool calling and output formats in a request body: OpenAI's shapes, checked at the boundary.

`ToolFields` is what ``/v1/chat/completions`` and ``/v1/messages`` share: the tools a
model may call, how it must choose (``tool_choice``), and the ``response_format`` its
answer follows. Malformed ones are 400s here (a tool without a name, a ``tool_choice``
naming a tool not offered, a schema that is not a JSON Schema); well-formed ones are
`Ask`s the model's engine must be able to honour, and `ToolFields.tooling` hands them to
the `GenerationRequest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from chatfleet.serving.api._schemas import OPAQUE, Ask, ChatMessage, ClientBody

__all__ = ["ResponseFormat", "TextFormat", "ToolBody", "ToolFields", "checked_schema"]


def checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` if it is a JSON Schema (of the draft its ``$schema`` names, else the
    latest); `ValueError` otherwise, as OpenAI's API refuses one."""
    if not isinstance(schema.get("$schema", ""), str):
        raise ValueError("not a valid JSON Schema: $schema is not a string")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return schema


class JsonSchemaFormat(ClientBody):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The format's name."
    )
    description: str | None = Field(None, description="What the format is for.")
    schema_: Annotated[dict[str, Any], OPAQUE] = Field(
        default_factory=dict, alias="schema", description="The JSON Schema the answer follows."
    )
    strict: bool | None = Field(None, strict=True, description="Follow the schema exactly.")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return checked_schema(schema)


class _Format(BaseModel):
    # Not a ClientBody: a discriminator takes no wrap validator, and ``type`` is a
    # literal anyway (json_schema's strings are checked by JsonSchemaFormat).
    model_config = ConfigDict(extra="forbid")

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class TextFormat(_Format):
    type: Literal["text"] = Field(description="Free text: asks for nothing.")


class JsonObjectFormat(_Format):
    type: Literal["json_object"] = Field(description="Any JSON object (structured output).")


class JsonSchemaResponseFormat(_Format):
    type: Literal["json_schema"] = Field(description="JSON following a schema (structured output).")
    json_schema: JsonSchemaFormat = Field(description="The schema and its name.")


#: OpenAI's three formats, told apart by ``type`` (the OpenAPI document says so too).
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class FunctionBody(ClientBody):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Its name."
    )
    description: str | None = Field(None, description="What it does, for the model.")
    parameters: Annotated[dict[str, Any] | None, OPAQUE] = Field(
        None, description="Its arguments, as a JSON Schema object."
    )
    strict: bool | None = Field(None, strict=True, description="Arguments follow the schema.")

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if schema is None else checked_schema(schema)


class ToolBody(ClientBody):
    """A tool the model may call: OpenAI's function tool."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="Only function tools are served.")
    function: FunctionBody = Field(description="The function.")


class NamedFunction(ClientBody):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The function that must be called.")


class NamedToolChoice(ClientBody):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="Only function tools are served.")
    function: NamedFunction = Field(description="Which one.")


def check_tool_choice(choice: Any, named: str | None, names: set[str]) -> None:
    """As OpenAI's API: a choice needs tools, and a named one (``named``) must be among
    them; chat completions' and the Responses API's validators both ask this."""
    if choice not in (None, "none") and not names:
        raise ValueError("tool_choice is only allowed when tools are specified")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice names {named!r}, which is not in tools")


class ToolFields(ClientBody):
    """The tool and format fields of a request (a mixin of request bodies)."""

    tools: list[ToolBody] | None = Field(
        None, max_length=128, description="Needs an engine with tools."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Needs an engine with tools ('none' asks for nothing)."
    )
    parallel_tool_calls: bool | None = Field(
        None, strict=True, description="Needs an engine with tools."
    )
    response_format: ResponseFormat | None = Field(
        None, description="'text'; json_object and json_schema need structured output."
    )

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        # A field validator, so the 400 names tool_choice; tools that failed say so first.
        if "tools" in info.data:
            names = {t.function.name for t in info.data["tools"] or ()}
            named = choice.function.name if isinstance(choice, NamedToolChoice) else None
            check_tool_choice(choice, named, names)
        return choice

    def tool_asks(self, messages: Sequence[ChatMessage]) -> list[Ask]:
        """What the tool and format fields, and tool messages in ``messages``, ask for."""
        asks = []
        if self.tools:
            asks.append(Ask("tools", "tools", "tools"))
        if self.tool_choice == "auto":
            asks.append(Ask("tool_choice", "tools", "tool_choice (tools)"))
        elif self.tool_choice not in (None, "none"):
            what = "tool_choice required or a named tool (forced tool calls)"
            asks.append(Ask("tool_choice", "forced_tool_choice", what))
        if self.parallel_tool_calls is not None:
            asks.append(Ask("parallel_tool_calls", "tools", "parallel_tool_calls (tools)"))
        for i, message in enumerate(messages):
            if message.asks_for_tools():
                asks.append(Ask(f"messages.{i}", "tools", "tool calls in messages (tools)"))
        if self.response_format is not None and self.response_format.type != "text":
            what = f"response_format {self.response_format.type} (structured output)"
            asks.append(Ask("response_format", "structured_output", what))
            if self.tools and self.tool_choice not in (None, "none", "auto"):
                choice = self.tool_choice
                named = "a named tool" if isinstance(choice, NamedToolChoice) else "required"
                what = f"response_format {self.response_format.type} with tool_choice {named}"
                asks.append(Ask("response_format", "forced_tool_choice_with_format", what))
        return asks

    def tooling(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.tools:
            fields["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in self.tools]
            choice = self.tool_choice
            fields["tool_choice"] = (
                choice.model_dump(mode="json") if isinstance(choice, NamedToolChoice) else choice
            )
            fields["parallel_tool_calls"] = self.parallel_tool_calls
        if self.response_format is not None and self.response_format.type != "text":
            fields["response_format"] = self.response_format.as_dict()
        return fields
