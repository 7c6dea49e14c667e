"""What each engine does with a request beyond its messages: the capability table
`GET /v1/models` shows and the ingress checks requests against (one place)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

EngineKind = Literal["fake", "transformers", "vllm", "ollama", "openai"]
ENGINE_KINDS: tuple[EngineKind, ...] = ("fake", "transformers", "vllm", "ollama", "openai")


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    """What an engine does with a request beyond messages, max_tokens, temperature, top_p.

    The ingress refuses (400) what a model's engine cannot do, rather than drop it, and
    ``GET /v1/models`` shows the flags. ``sampling`` names the extra sampling parameters
    the engine passes on (``top_k``, ``repetition_penalty``, ...).
    """

    stop: bool = True
    seed: bool = True
    #: Reasoning comes back apart from the answer (``reasoning_content``).
    reasoning: bool = True
    tools: bool = False
    #: ``tool_choice`` ``required`` or a named tool can be enforced (not only hinted).
    forced_tool_choice: bool = False
    #: A forced ``tool_choice`` and a ``response_format`` in one request (off where
    #: the one constrains the answer by the same means as the other).
    forced_tool_choice_with_format: bool = True
    structured_output: bool = False
    vision: bool = False
    logprobs: bool = False
    sampling: frozenset[str] = frozenset()
    #: Why a flag is off, where the reason is not plain (capability -> reason): the 400
    #: that refuses it says so.
    why_not: tuple[tuple[str, str], ...] = ()

    @classmethod
    def shared(cls, every: Sequence[EngineCapabilities]) -> EngineCapabilities:
        """What each of ``every`` can do (model ``auto`` may answer with any of them)."""
        if not every:
            return cls()
        flags: dict[str, Any] = {name: all(getattr(c, name) for c in every) for name in _FLAGS}
        return cls(**flags, sampling=frozenset.intersection(*(c.sampling for c in every)))

    @classmethod
    def combined(cls, every: Sequence[EngineCapabilities]) -> EngineCapabilities:
        """What at least one of ``every`` can do."""
        if not every:
            return cls()
        flags: dict[str, Any] = {name: any(getattr(c, name) for c in every) for name in _FLAGS}
        return cls(**flags, sampling=frozenset.union(*(c.sampling for c in every)))

    def reason_lacking(self, capability: str) -> str | None:
        return dict(self.why_not).get(capability)

    def supports(self, capability: str) -> bool:
        """Whether the engine has ``capability``: a flag's name; anything else it has not."""
        return capability in _FLAGS and bool(getattr(self, capability))

    def as_dict(self) -> dict[str, Any]:
        return {
            "stop": self.stop,
            "seed": self.seed,
            "reasoning": self.reasoning,
            "tools": self.tools,
            "forced_tool_choice": self.forced_tool_choice,
            "structured_output": self.structured_output,
            "vision": self.vision,
            "logprobs": self.logprobs,
            "sampling_parameters": sorted(self.sampling),
        }


_FLAGS = frozenset(
    {
        "stop",
        "seed",
        "reasoning",
        "tools",
        "forced_tool_choice",
        "forced_tool_choice_with_format",
        "structured_output",
        "vision",
        "logprobs",
    }
)
_PENALTIES = frozenset({"frequency_penalty", "presence_penalty"})
_VLLM_NO_PARSER = (
    "no tool parser is configured for it; set vllm.tool_call_parser to the vLLM tool"
    " parser of the model's tool-call format (hermes, llama3_json, mistral, qwen3_xml...)"
)
#: Every engine's capabilities: the one place that knows what each passes on.
ENGINE_CAPABILITIES: dict[EngineKind, EngineCapabilities] = {
    # Scripted tool calls and answers generated from the schema (`fake.tool_calls`);
    # made-up logprobs (`fake.logprobs`).
    "fake": EngineCapabilities(
        tools=True, forced_tool_choice=True, structured_output=True, logprobs=True
    ),
    # repetition_penalty: per request, over the model's configured one. Logprobs from
    # the raw logits of each step.
    "transformers": EngineCapabilities(
        logprobs=True,
        sampling=frozenset({"repetition_penalty"}),
        why_not=(
            (
                "tools",
                "it samples free text and has no parser to read tool calls out of it;"
                " serve the model with vLLM (vllm.tool_call_parser) or Ollama for tools",
            ),
            (
                "structured_output",
                "it has no constrained decoder, so JSON could not be guaranteed;"
                " serve the model with vLLM or Ollama for response_format",
            ),
        ),
    ),
    # Structured output by vLLM's guided decoding; its sampler's logprobs; tools once
    # the model names its parser (`ModelConfig.capabilities`).
    "vllm": EngineCapabilities(
        structured_output=True,
        logprobs=True,
        sampling=_PENALTIES | {"top_k", "min_p", "repetition_penalty"},
        why_not=tuple((flag, _VLLM_NO_PARSER) for flag in ("tools", "forced_tool_choice")),
    ),
    # Native tools, format and logprobs; sampling into Ollama's options (repeat_penalty...).
    # A forced tool_choice is a format too (the calls' schema, as vLLM does it).
    "ollama": EngineCapabilities(
        tools=True,
        forced_tool_choice=True,
        forced_tool_choice_with_format=False,
        structured_output=True,
        logprobs=True,
        sampling=_PENALTIES | {"top_k", "min_p", "repetition_penalty"},
        why_not=(
            (
                "forced_tool_choice_with_format",
                "they conflict: Ollama has one format, and a forced tool_choice takes it"
                " for the calls' schema",
            ),
        ),
    ),
    # Passed through. OpenAI's own penalties; top_k and the like are not OpenAI's.
    "openai": EngineCapabilities(
        tools=True,
        forced_tool_choice=True,
        structured_output=True,
        logprobs=True,
        sampling=_PENALTIES,
    ),
}
