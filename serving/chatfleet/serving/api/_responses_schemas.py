"""`POST /v1/responses`'s body: OpenAI's Responses API, mapped onto chat completions' support.

The request is held to the same rules as ``/v1/chat/completions``: a field the API does
not know is a 400 ("Unrecognized request argument"), and what the model's engine cannot
honour is refused, not dropped. Function tools (``{"type": "function", "name": ...}``)
become chat tools, ``text.format`` becomes ``response_format``, ``max_output_tokens``
becomes ``max_tokens`` (`ResponsesRequest.sampling`); the input items become messages
(`ResponsesRequest.input_messages`; reasoning items sent back are left out). Tools of
other types (OpenAI's hosted web search, file search...) are refused with a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from chatfleet.serving.api._schemas import OPAQUE, Ask, ClientBody, SamplingFields
from chatfleet.serving.api._tool_schemas import (
    FunctionBody,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaResponseFormat,
    NamedFunction,
    NamedToolChoice,
    TextFormat,
    ToolBody,
    ToolFields,
    check_tool_choice,
)
from chatfleet.serving.protocol import Message, ToolCall

__all__ = ["ResponsesRequest", "ResponsesSampling"]

_NAME = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Its name.")


class _Item(ClientBody):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200, description="The item's id (as answered).")
    status: Literal["in_progress", "completed", "incomplete"] | None = Field(
        None, description="The item's status (as answered); not used."
    )


class InputText(ClientBody):
    """A text part: ``input_text``, or ``output_text`` in an assistant's replayed message."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"] = Field(description="Only text parts are served.")
    text: str = Field(description="The text.")
    annotations: Annotated[list[Any] | None, OPAQUE] = Field(
        None, description="An answer's annotations (replayed output); not used."
    )
    logprobs: Annotated[list[Any] | None, OPAQUE] = Field(
        None, description="An answer's logprobs (replayed output); not used."
    )


class InputMessage(_Item):
    type: Literal["message"] = Field("message", description="A message.")
    role: Literal["user", "system", "developer", "assistant"] = Field(description="Its author.")
    content: str | list[InputText] = Field(description="A text, or text parts.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Said before the union is tried, naming the part's type (an image, a file), not
        # as "content.str: Input should be a valid string".
        for i, part in enumerate(value if isinstance(value, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text"):
                raise ValueError(
                    f"content[{i}]: part type {kind!r} is not served: only text (no model"
                    " here has vision or reads files)"
                )
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallItem(_Item):
    """A function call the model made (an earlier answer's output, sent back)."""

    type: Literal["function_call"] = Field(description="A function call.")
    call_id: str = Field(min_length=1, max_length=200, description="The call's id.")
    name: str = Field(min_length=1, max_length=64, description="The function called.")
    arguments: str = Field(description="Its arguments, a JSON text.")


class FunctionCallOutputItem(_Item):
    """A function's result, for the call ``call_id``."""

    type: Literal["function_call_output"] = Field(description="A function's result.")
    call_id: str = Field(min_length=1, max_length=200, description="The call it answers.")
    output: str = Field(description="The result, as text.")


class ReasoningItem(_Item):
    """An earlier answer's reasoning, sent back with its output (as agents replay
    ``response.output``): accepted, and left out of the prompt, as chat templates leave
    earlier thinking out."""

    type: Literal["reasoning"] = Field(description="Reasoning.")
    summary: Annotated[list[Any], OPAQUE] = Field(
        default_factory=list, description="Its summary; not used."
    )
    content: Annotated[list[Any] | None, OPAQUE] = Field(None, description="Its text; not used.")
    encrypted_content: Annotated[str | None, OPAQUE] = Field(None, description="Not used.")


def _tagged(value: Any, default: str | None = None) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", default)
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


def _item_type(value: Any) -> str | None:
    # OpenAI's "easy" input message has no type: {"role": "user", "content": "..."}.
    return _tagged(value, "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_input_item",
        custom_error_message="only message, function_call, function_call_output and"
        " reasoning items are served",
    ),
]


class FunctionTool(ClientBody):
    """A function tool in the Responses shape: its fields at the top, not under ``function``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="Only function tools are served.")
    name: str = _NAME
    description: str | None = Field(None, description="What it does, for the model.")
    parameters: Annotated[dict[str, Any] | None, OPAQUE] = Field(
        None, description="Its arguments, as a JSON Schema object."
    )
    strict: bool | None = Field(None, strict=True, description="Arguments follow the schema.")

    def as_chat_tool(self) -> ToolBody:
        function = FunctionBody(
            name=self.name,
            description=self.description,
            parameters=self.parameters,
            strict=self.strict,
        )
        return ToolBody(type="function", function=function)


class FunctionChoice(ClientBody):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = Field(description="Only function tools are served.")
    name: str = Field(min_length=1, description="The function that must be called.")


class JsonSchemaTextFormat(JsonSchemaFormat):
    """``text.format`` json_schema: the schema's fields next to ``type`` (Responses shape)."""

    type: Literal["json_schema"] = Field(description="JSON following a schema.")


class TextConfig(ClientBody):
    model_config = ConfigDict(extra="forbid")

    format: Annotated[
        Annotated[TextFormat, Tag("text")]
        | Annotated[JsonObjectFormat, Tag("json_object")]
        | Annotated[JsonSchemaTextFormat, Tag("json_schema")],
        # A callable: JsonSchemaTextFormat's ``type`` has ClientBody's wrap validator.
        Discriminator(
            _tagged,
            custom_error_type="invalid_format",
            custom_error_message="text.format type must be text, json_object or json_schema",
        ),
    ] = Field(
        # As OpenAI's API: ``text`` without a format (``{"verbosity": ...}``) is free text.
        default_factory=lambda: TextFormat(type="text"),
        description="text; json_object and json_schema need structured output.",
    )


class ResponsesSampling(ToolFields, SamplingFields):
    """What a Responses request asks of the engine, in chat completions' terms; the
    refusals name the Responses parameter (``text.format``, ``input``)."""

    model_config = ConfigDict(extra="forbid")

    #: Whether the conversation holds function calls or their results.
    with_tool_messages: bool = False

    def asks(self) -> list[Ask]:
        asks = [*super().asks(), *self.tool_asks([])]
        if self.with_tool_messages:
            asks.append(Ask("input", "tools", "function calls in input (tools)"))
        renamed = {"response_format": "text.format", "max_tokens": "max_output_tokens"}
        return [
            Ask(
                renamed.get(a.param, a.param),
                a.capability,
                a.what.replace("response_format", "text.format"),
            )
            for a in asks
        ]


def _text_or_items(schema: dict[str, Any]) -> None:
    # Validated as items (a text becomes one user message, so a bad item's error names
    # the item); documented as OpenAI's API takes it.
    items = {"type": "array", "items": schema.pop("items"), "minItems": schema.pop("minItems")}
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "string"}, items]


def _strict(default: Any = None, **constraints: Any) -> Any:
    return Field(default, strict=True, **constraints)


class ResponsesRequest(ClientBody):
    """`POST /v1/responses`: OpenAI's Responses API (text and function tools)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A served model's name, or 'auto'.")
    input: list[InputItem] = Field(
        min_length=1,
        description="A user message, or items: messages, function calls and their outputs.",
        json_schema_extra=_text_or_items,
    )
    instructions: str | None = Field(
        None,
        description="A system message for this response only (not carried over by"
        " previous_response_id, as in OpenAI's API).",
    )
    previous_response_id: str | None = Field(
        None, max_length=64, description="A stored response of the caller's to continue."
    )
    store: bool = _strict(True, description="Keep the response (for previous_response_id, GET).")
    stream: bool = _strict(False, description="Stream the answer as server-sent events.")
    max_output_tokens: int | None = _strict(ge=1, description="Answer length cap.")
    temperature: float | None = _strict(ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = _strict(gt=0, le=1, description="Nucleus sampling mass.")
    tools: list[FunctionTool] | None = Field(
        None, max_length=128, description="Function tools (needs an engine with tools)."
    )
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = Field(
        None, description="Needs an engine with tools ('none' asks for nothing)."
    )
    parallel_tool_calls: bool | None = _strict(description="Needs an engine with tools.")
    text: TextConfig | None = Field(None, description="The answer's format.")
    metadata: dict[str, str] | None = Field(
        None, max_length=16, description="Kept with the response and answered back."
    )
    user: str | None = Field(None, max_length=256, description="The end user's id; informational.")
    safety_identifier: str | None = Field(
        None, max_length=256, description="The end user's id (OpenAI's newer name); informational."
    )
    prompt_cache_key: str | None = Field(
        None, max_length=256, description="A caching hint; informational."
    )
    truncation: Literal["disabled"] | None = Field(
        None, description="Only 'disabled': a prompt too long for the model is an error."
    )
    include: list[str] | None = Field(
        None,
        max_length=0,
        description="Only empty (as OpenAI's Agents SDK always sends it): nothing extra"
        " (encrypted reasoning, logprobs, hosted tools' results) is served.",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("include", mode="before")
    @classmethod
    def _nothing_included(cls, value: Any) -> Any:
        if isinstance(value, list) and value:
            raise ValueError(
                "only [] is served: no encrypted reasoning, output logprobs or hosted"
                " tools' results are kept to include"
            )
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        # Said before the union is tried, in one sentence naming the tool's type.
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(
                    f"tools[{i}]: tool type {kind!r} is not served: only function tools"
                )
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" in info.data:  # a field validator, so the 400 names tool_choice
            names = {t.name for t in info.data["tools"] or ()}
            named = choice.name if isinstance(choice, FunctionChoice) else None
            check_tool_choice(choice, named, names)
        return choice

    def input_messages(self) -> list[Message]:
        """The input items as messages: a run of function calls is one assistant message
        (with the text of an assistant message right before it)."""
        messages: list[Message] = []
        for item in self.input:
            if isinstance(item, InputMessage):
                role = "system" if item.role in ("system", "developer") else item.role
                messages.append(Message(role=role, content=item.text()))  # type: ignore[arg-type]
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    messages[-1] = Message("assistant", last.content, (*last.tool_calls, call))
                else:
                    messages.append(Message("assistant", "", (call,)))
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(Message("tool", item.output, tool_call_id=item.call_id))
        return messages

    def sampling(self, *, with_tool_messages: bool) -> ResponsesSampling:
        """The request in chat completions' terms (``with_tool_messages``: the conversation,
        earlier turns included, holds function calls or results)."""
        choice = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        response_format: TextFormat | JsonObjectFormat | JsonSchemaResponseFormat | None
        if isinstance(fmt, JsonSchemaTextFormat):
            schema = JsonSchemaFormat.model_validate(
                fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
            )
            response_format = JsonSchemaResponseFormat(type="json_schema", json_schema=schema)
        else:
            response_format = fmt
        return ResponsesSampling(
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            tools=[t.as_chat_tool() for t in self.tools] if self.tools else None,
            tool_choice=NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
            if isinstance(choice, FunctionChoice)
            else choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=response_format,
            with_tool_messages=with_tool_messages,
        )
