"""`POST /v1/chat/completions`'s body: every OpenAI parameter, honoured or refused.

OpenAI's own API answers a field it does not know with a 400 ("Unrecognized request
argument supplied: foo"), and so does this model (``extra="forbid"``; the wording is
set where validation errors become responses). Besides OpenAI's parameters it knows
chatfleet's documented extensions: ``conversation_id``, and the sampling extras some
engines pass on (`SAMPLING_EXTRAS`).

A parameter the model's engine cannot honour is not dropped: `ChatCompletionRequest.asks`
lists what the request needs, and the gateway refuses it (400, naming the parameter and
the model) when the engine's capabilities lack it. A parameter given its neutral value
(``tools: []``, ``logprobs: false``, ``n: 1``, ``response_format: {"type": "text"}``,
OpenAI's penalties at 0, as OpenAI's playground code sends them) asks for nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from chatfleet.serving.api._schemas import OPAQUE, Ask, ChatMessage, ClientBody, SamplingFields
from chatfleet.serving.api._tool_schemas import ToolFields
from chatfleet.serving.config import EngineCapabilities

__all__ = ["SAMPLING_EXTRAS", "ChatCompletionRequest", "document_what_is_served"]

#: Sampling parameters beyond temperature/top_p that some engines honour (see each
#: engine's capabilities); refused with a 400 by the others.
SAMPLING_EXTRAS = (
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
)
#: OpenAI's own sampling extras, at the value OpenAI's API defaults them to.
_NEUTRAL_PENALTIES = {"frequency_penalty": 0, "presence_penalty": 0}


class StreamOptions(ClientBody):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, strict=True, description="End the stream with a chunk that carries usage."
    )


class OpenAIMessage(ChatMessage):
    """A chat message of /v1/chat/completions (its own name in the OpenAPI document,
    which says what the served engines can take: no tool messages without tools...)."""


def _needs(field: str, kind: str, flag: str) -> dict[str, Any]:
    return {
        "if": {"properties": {field: {"type": kind}}, "required": [field]},
        "then": {"properties": {flag: {"const": True}}, "required": [flag]},
    }


def _options_with_their_flags(schema: dict[str, Any]) -> None:
    # The document says what `_with_logprobs` and `_with_stream` check, so no generated
    # client (or schema-driven test) believes top_logprobs alone is a request.
    needs = [_needs("top_logprobs", "integer", "logprobs")]
    needs.append(_needs("stream_options", "object", "stream"))
    schema.setdefault("allOf", []).extend(needs)


def _strict(default: Any = None, **constraints: Any) -> Any:
    return Field(default, strict=True, **constraints)


class ChatCompletionRequest(ToolFields, SamplingFields):
    """`POST /v1/chat/completions`: OpenAI's parameters plus chatfleet's extensions."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_options_with_their_flags)

    model: str = Field(min_length=1, description="A served model's name, or 'auto'.")
    messages: list[OpenAIMessage] = Field(min_length=1, description="The conversation so far.")
    stream: bool = _strict(False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = _strict(ge=1, description="Alias of max_tokens.")
    n: int = _strict(1, ge=1, le=128, description="Choices to generate; only 1 is served.")
    user: str | None = Field(
        None, max_length=256, description="The end user's id; informational, as in OpenAI's API."
    )
    safety_identifier: str | None = Field(
        None, max_length=256, description="The end user's id (OpenAI's newer name); informational."
    )
    prompt_cache_key: str | None = Field(
        None,
        max_length=256,
        description="A caching hint; informational (engines cache prefixes on their own).",
    )
    conversation_id: str | None = Field(
        None,
        max_length=200,
        description="chatfleet extension: requests of one conversation stick to its route"
        " (model 'auto'); the x-chatfleet-conversation-id header does the same.",
    )
    # Sampling extras: honoured by the engines that declare them, refused by the others.
    frequency_penalty: float | None = _strict(ge=-2, le=2, description="OpenAI's penalty.")
    presence_penalty: float | None = _strict(ge=-2, le=2, description="OpenAI's penalty.")
    top_k: int | None = _strict(ge=-1, le=100_000, description="Extension (vLLM, Ollama).")
    min_p: float | None = _strict(ge=0, le=1, description="Extension (vLLM, Ollama).")
    repetition_penalty: float | None = _strict(
        gt=0, le=10, description="Extension (vLLM, Ollama, transformers)."
    )
    # OpenAI parameters that need an engine capability, or that nothing here serves.
    functions: Annotated[list[dict[str, Any]] | None, OPAQUE] = Field(
        None, description="Deprecated tools."
    )
    function_call: Annotated[str | dict[str, Any] | None, OPAQUE] = Field(
        None, description="Deprecated tools."
    )
    logprobs: bool | None = _strict(
        description="Each answer token's log probability (needs an engine with logprobs)."
    )
    top_logprobs: int | None = _strict(
        ge=0, le=20, description="How many most likely tokens to list at each position."
    )
    logit_bias: dict[str, float] | None = Field(None, description="Not served.")
    modalities: list[str] | None = Field(None, description="Only ['text'] is served.")
    audio: Annotated[dict[str, Any] | None, OPAQUE] = Field(None, description="Not served.")
    prediction: Annotated[dict[str, Any] | None, OPAQUE] = Field(None, description="Not served.")
    reasoning_effort: str | None = Field(None, description="Not served.")
    verbosity: str | None = Field(None, description="Not served.")
    web_search_options: Annotated[dict[str, Any] | None, OPAQUE] = Field(
        None, description="Not served."
    )
    store: bool | None = _strict(description="Only false: chatfleet keeps no completions.")
    metadata: dict[str, str] | None = Field(None, description="Only with store; not served.")
    service_tier: str | None = Field(None, description="Only 'auto' or 'default'.")

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            # As OpenAI's API answers it, rather than a top_logprobs nobody gets.
            raise ValueError("top_logprobs must be used with logprobs set to true")
        return value

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            # As OpenAI's API (and vLLM's server) answer it: the options would go unused.
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @model_validator(mode="after")
    def _alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def sampling_extras(self) -> dict[str, int | float]:
        return {
            name: value
            for name in SAMPLING_EXTRAS
            if (value := getattr(self, name)) is not None and value != _NEUTRAL_PENALTIES.get(name)
        }

    def tooling(self) -> dict[str, Any]:
        fields = super().tooling()
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return fields

    def asks(self) -> list[Ask]:
        asks = super().asks()
        asks += self.tool_asks(self.messages)
        if self.functions or self.function_call not in (None, "none"):
            # Deprecated by OpenAI; no engine here is handed them, even one with tools.
            param = "functions" if self.functions else "function_call"
            asks.append(Ask(param, "functions", f"{param} (deprecated: use tools)"))
        for i, message in enumerate(self.messages):
            if message.asks_for_vision():
                asks.append(Ask(f"messages.{i}.content", "vision", "non-text content (vision)"))
        if self.logprobs:  # top_logprobs comes with it (`_with_logprobs`)
            asks.append(Ask("logprobs", "logprobs", "logprobs"))
        if self.n > 1:
            asks.append(Ask("n", "n", "n > 1 (one choice per request)"))
        if self.logit_bias:
            asks.append(Ask("logit_bias", "logit_bias", "logit_bias"))
        if self.modalities is not None and self.modalities != ["text"]:
            asks.append(Ask("modalities", "audio", "modalities other than ['text']"))
        unserved = {
            "audio": self.audio,
            "prediction": self.prediction,
            "reasoning_effort": self.reasoning_effort,
            "verbosity": self.verbosity,
            "web_search_options": self.web_search_options,
            "metadata": self.metadata,
        }
        asks += [Ask(name, name, name) for name, value in unserved.items() if value is not None]
        if self.store:
            asks.append(Ask("store", "store", "store (stored completions)"))
        if self.service_tier not in (None, "auto", "default"):
            asks.append(Ask("service_tier", "service_tier", f"service_tier {self.service_tier}"))
        return asks


#: The value of each capability-gated parameter that asks for nothing.
_NEUTRAL: dict[str, dict[str, Any]] = {
    "tools": {"type": "array", "maxItems": 0},
    "functions": {"type": "array", "maxItems": 0},
    "tool_choice": {"type": "string", "enum": ["none"]},
    "function_call": {"type": "string", "enum": ["none"]},
    "logprobs": {"type": "boolean", "enum": [False]},
    "store": {"type": "boolean", "enum": [False]},
    "logit_bias": {"type": "object", "maxProperties": 0},
    "service_tier": {"type": "string", "enum": ["auto", "default"]},
    "modalities": {
        "type": "array",
        "items": {"type": "string", "enum": ["text"]},
        "minItems": 1,
        "maxItems": 1,
    },
}
_NEVER_SERVED = ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options")
_FLAG_OF = {
    "tools": "tools",
    "functions": "functions",
    "tool_choice": "tools",
    "function_call": "functions",
    "parallel_tool_calls": "tools",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "response_format": "structured_output",
}


def document_what_is_served(schemas: dict[str, Any], served: EngineCapabilities) -> None:
    """Narrow the request's OpenAPI schemas to what some served model can do.

    ``served`` is what at least one served model supports (`EngineCapabilities.combined`):
    a parameter none of them honours is documented with its neutral value only, so the
    document promises nothing the server refuses. (One model's refusal of what another
    honours is a 400 the document cannot express.)
    """
    request = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    for name, neutral in _NEUTRAL.items():
        if name in request and not served.supports(_FLAG_OF.get(name, name)):
            _only(request[name], neutral)
    for name in (*_NEVER_SERVED, "metadata"):
        if name in request:
            _only(request[name], None)
    for name, flag in _FLAG_OF.items():
        if name in request and name not in _NEUTRAL and not served.supports(flag):
            if name == "response_format":
                _only(request[name], {"$ref": "#/components/schemas/TextFormat"})
            else:
                _only(request[name], None)
    for name in SAMPLING_EXTRAS:
        if name in request and name not in served.sampling:
            zero = _NEUTRAL_PENALTIES.get(name)
            _only(request[name], None if zero is None else {"type": "number", "enum": [zero]})
    if "n" in request:
        request["n"]["maximum"] = 1
    message = schemas.get("OpenAIMessage", {}).get("properties", {})
    if message and not served.tools:
        message["role"]["enum"] = [r for r in message["role"]["enum"] if r != "tool"]
        _only(message["tool_calls"], {"type": "array", "maxItems": 0})
        _only(message["tool_call_id"], None)
    if message and not served.vision:
        for branch in message["content"].get("anyOf", []):
            if branch.get("type") == "array":
                branch["items"] = {"$ref": "#/components/schemas/TextPart"}
        schemas["TextPart"] = {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["text"]},
                "text": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["type"],
        }


def _only(field: dict[str, Any], neutral: dict[str, Any] | None) -> None:
    """``field`` takes null (leaving it out) and ``neutral`` alone."""
    kept: dict[str, Any] = {k: field[k] for k in ("title", "description") if k in field}
    field.clear()
    field.update(kept)
    field["anyOf"] = [{"type": "null"}] if neutral is None else [neutral, {"type": "null"}]
