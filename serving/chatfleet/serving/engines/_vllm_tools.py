"""Tool calls on the in-process vLLM engine, made the way vLLM's own OpenAI server makes them.

vLLM 0.32's server is the reference (``entrypoints/openai/chat_completion/serving.py``,
``parser/abstract_parser.py``, ``tool_parsers/``); what it does is mirrored here:

- The prompt: the chat template gets the tools (``tools=``, also with tool_choice
  ``none``, as vLLM does by default) and the history's calls with their arguments as
  objects, not JSON text (``_postprocess_messages``: what tool templates expect).
- ``auto``: the model writes calls in its own format, read by the configured
  ``ToolParser`` (``extract_tool_calls_streaming``); at the end, what the parser
  parsed but had not streamed yet is added (``get_remaining_unstreamed_args``).
- ``required`` and a named function: structured outputs hold the answer to vLLM's
  JSON (``get_json_schema_from_tools``), so even a model that would never call a tool
  does: a named call's answer is its arguments object, a required one's an array of
  ``{"name", "parameters"}`` (one item at most with ``parallel_tool_calls: false``),
  read while it streams as ``extract_required_tool_call_streaming`` reads it.
- ``none``: the answer is text and is not parsed.
- ``parallel_tool_calls: false``: calls past the first are dropped
  (``maybe_filter_parallel_tool_calls``).

The engine contract is one stream: a non-streamed answer is the same stream gathered
by the ingress, so both read calls with the streaming parser.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from chatfleet.serving.engines._vllm_tool_readers import ParserReader, ToolReader
from chatfleet.serving.errors import EngineUnavailable
from chatfleet.serving.protocol import GenerationRequest, Message

__all__ = ["ToolParsing", "forced_tool_schema", "template_messages", "tool_parser_class"]


def template_messages(messages: Iterable[Message], *, objects: bool = True) -> list[dict[str, Any]]:
    """The conversation as chat templates take it, tool calls and results included.

    ``objects=False``: the calls' arguments stay JSON text, as in OpenAI's wire shape.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": _arguments_object(c.arguments) if objects else c.arguments,
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments_object(arguments: str) -> dict[str, Any]:
    # As vLLM: arguments that are not a JSON object become {} rather than fail every
    # later turn of the conversation that holds them.
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def forced_tool_schema(request: GenerationRequest) -> dict[str, Any] | None:
    """The JSON Schema vLLM holds a ``required`` or named tool choice to; None otherwise."""
    choice, tools = request.tool_choice, request.tools
    if not tools or choice in (None, "none", "auto"):
        return None
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict):
        return _parameters(functions[choice["function"]["name"]])
    items = []
    defs: dict[str, Any] = {}
    for name, function in functions.items():
        parameters = _parameters(function)
        # The tools' $defs move to the top, where the items' $refs resolve.
        defs.update(parameters.pop("$defs", None) or {})
        items.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": items},
    }
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # Arguments are always an object, "{}" for a function without parameters.
    return copy.deepcopy(function.get("parameters")) or {"type": "object", "properties": {}}


def tool_parser_class(name: str, model: str) -> Any:
    """vLLM's tool parser registered as ``name`` (its ``--tool-call-parser``).

    Looked up before vLLM starts, so a wrong name fails at once, listing the right ones.
    """
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # older vLLM kept them under its OpenAI server
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    listed = getattr(ToolParserManager, "list_registered", None)
    registered = sorted(listed() if listed else ToolParserManager.tool_parsers)
    if name not in registered:
        raise EngineUnavailable(
            f"model {model!r}: vllm.tool_call_parser {name!r} is not one of vLLM's tool"
            f" parsers: {', '.join(registered)}"
        )
    try:
        return ToolParserManager.get_tool_parser(name)
    except Exception as exc:  # a lazily registered parser failed to import
        raise EngineUnavailable(
            f"model {model!r}: vLLM's tool parser {name!r} failed to load: {exc}"
        ) from exc


class ToolParsing:
    """Tool calls of one model with vLLM's tool parser ``parser_class`` (`tool_parser_class`).

    Checked as vLLM's server checks it at start: the parser must take the model's
    tokenizer (Hermes' needs none of its tags to be tokens, others do).
    """

    def __init__(self, parser_class: Any, name: str, model: str, tokenizer: Any) -> None:
        try:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        except ImportError:  # older vLLM
            from vllm.entrypoints.openai.protocol import ChatCompletionRequest
        try:
            parser_class(tokenizer)
        except Exception as exc:
            raise EngineUnavailable(
                f"model {model!r}: vLLM's tool parser {name!r} cannot be used with its"
                f" tokenizer: {type(exc).__name__}: {exc}"
            ) from exc
        self._parser_class = parser_class
        self._tokenizer = tokenizer
        self._request_class = ChatCompletionRequest

    def begin(self, request: GenerationRequest) -> tuple[ToolReader | None, bool]:
        """The reader of ``request``'s answer (None when it is plain text), and whether
        the answer's special tokens must stay in its text, where the parser looks for
        them (vLLM's ``adjust_request``: Hermes' ``<tool_call>`` may be one)."""
        if not request.tools:
            return None, False
        parser = self._parser_class(self._tokenizer)
        # Adjusted as vLLM's server adjusts it before its parser reads the answer.
        vllm_request = parser.adjust_request(self._vllm_request(request))
        keep_special = not getattr(vllm_request, "skip_special_tokens", True)
        reader = ToolReader.for_request(
            request, lambda request: ParserReader(request, parser, vllm_request)
        )
        return reader, keep_special

    def _vllm_request(self, request: GenerationRequest) -> Any:
        # The request as vLLM's parsers read it (its tools, its tool_choice).
        fields: dict[str, Any] = {
            "model": request.model,
            "messages": template_messages(request.messages, objects=False),
            "tools": request.tools,
            "tool_choice": request.tool_choice or "auto",
        }
        if request.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = request.parallel_tool_calls
        return self._request_class(**fields)
