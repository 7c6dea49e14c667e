"""The vllm engine without vLLM: a clear error naming the extra, and its logic on a stand-in."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import sys
import types
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, ClassVar

import jinja2
import pytest

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines.vllm_async import VLLMEngine
from chatfleet.serving.errors import EngineError, EngineUnavailable, RequestError
from chatfleet.serving.protocol import GenerationRequest, Message, Usage

# find_spec alone is not enough: with tests/ on sys.path, the tests/vllm folder is a
# namespace package "vllm" (no origin). Only a real vLLM makes this test moot.
_spec = importlib.util.find_spec("vllm")
if _spec is not None and _spec.origin is not None:
    pytest.skip("vLLM is installed here (tests/vllm_cpu exercise it)", allow_module_level=True)


def _model() -> ModelConfig:
    return ModelConfig(name="big", engine="vllm", vllm={"model": "org/some-model"})


def test_the_engine_is_created_without_vllm() -> None:
    assert isinstance(create_engine(_model()), VLLMEngine)


async def test_start_without_vllm_names_the_gpu_extra() -> None:
    engine = create_engine(_model())

    with pytest.raises(EngineUnavailable, match=r"pip install 'chatfleet\[gpu\]'") as caught:
        await engine.start()

    assert caught.value.status_code == 503
    assert caught.value.code == "engine_unavailable"
    assert isinstance(caught.value.__cause__, ImportError)


async def test_stream_before_start_is_engine_unavailable() -> None:
    engine = VLLMEngine(_model())
    request = GenerationRequest(model="big", messages=[Message("user", "hi")])

    with pytest.raises(EngineUnavailable, match="not started"):
        await anext(engine.stream(request))


def test_engine_args_carry_the_settings_and_pass_extras_through() -> None:
    model = ModelConfig(
        name="big",
        engine="vllm",
        vllm={
            "model": "org/some-model",
            "tensor_parallel_size": 2,
            "max_model_len": 4096,
            "dtype": "bfloat16",
            "enforce_eager": True,
            "engine_args": {"max_num_seqs": 8, "gpu_memory_utilization": 0.5},
        },
    )

    assert VLLMEngine(model).engine_args() == {
        "model": "org/some-model",
        "served_model_name": ["big"],
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.5,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_num_seqs": 8,
    }


# The engine's own logic (chat template, think split, token accounting, finish reasons,
# error mapping, abort on disconnect) against a stand-in for vLLM's AsyncLLM API, so the
# main environment checks it on every run; tests/vllm_cpu run the same paths on real vLLM.


class _OutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class _Params:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class _ClientError(Exception):
    """Plays vllm.exceptions.VLLMClientError."""


class _Tokenizer:
    def __init__(self, generation_prompt: str, chat_template: str | None) -> None:
        self.generation_prompt = generation_prompt
        self.chat_template = chat_template

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize and add_generation_prompt
        if messages[0]["role"] == "assistant":
            raise jinja2.TemplateError("Conversation must start with a user message")
        turns = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return turns + self.generation_prompt

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        assert not add_special_tokens
        return list(range(len(text.split())))


class _FakeAsyncLLM:
    """Streams a script of ``(text, tokens)`` deltas, then finishes with ``reason``."""

    instances: ClassVar[list[_FakeAsyncLLM]] = []
    script: ClassVar[list[tuple[str, int]]] = []
    reason: ClassVar[str] = "stop"
    fail_with: ClassVar[Exception | None] = None
    generation_prompt: ClassVar[str] = "<|assistant|>"
    chat_template: ClassVar[str | None] = "{{ messages }}"

    def __init__(self, args: _Params) -> None:
        self.args = args
        self.requests: list[tuple[Any, _Params, str]] = []
        self.aborted: list[str] = []
        self.closed_generators = 0
        self.shut_down = False
        _FakeAsyncLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, args: _Params) -> _FakeAsyncLLM:
        return cls(args)

    def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer(self.generation_prompt, self.chat_template)

    async def generate(
        self, prompt: Any, params: _Params, request_id: str
    ) -> AsyncIterator[SimpleNamespace]:
        self.requests.append((prompt, params, request_id))
        try:
            if self.fail_with is not None:
                raise self.fail_with
            for i, (text, tokens) in enumerate(self.script):
                await asyncio.sleep(0)
                last = i == len(self.script) - 1
                completion = SimpleNamespace(
                    text=text, token_ids=[7] * tokens, finish_reason=self.reason if last else None
                )
                yield SimpleNamespace(
                    prompt_token_ids=prompt["prompt_token_ids"],
                    outputs=[completion],
                    finished=last,
                )
        finally:
            self.closed_generators += 1

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeAsyncLLM]:
    modules = {
        name: types.ModuleType(name)
        for name in (
            "vllm",
            "vllm.engine",
            "vllm.engine.arg_utils",
            "vllm.sampling_params",
            "vllm.v1",
            "vllm.v1.engine",
            "vllm.v1.engine.async_llm",
            "vllm.exceptions",
        )
    }
    modules["vllm.engine.arg_utils"].AsyncEngineArgs = _Params  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].SamplingParams = _Params  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].RequestOutputKind = _OutputKind  # type: ignore[attr-defined]
    modules["vllm.v1.engine.async_llm"].AsyncLLM = _FakeAsyncLLM  # type: ignore[attr-defined]
    modules["vllm.exceptions"].VLLMClientError = _ClientError  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(_FakeAsyncLLM, "instances", [])
    monkeypatch.setattr(_FakeAsyncLLM, "script", [("Hello", 1), (" world", 2)])
    monkeypatch.setattr(_FakeAsyncLLM, "reason", "stop")
    monkeypatch.setattr(_FakeAsyncLLM, "fail_with", None)
    monkeypatch.setattr(_FakeAsyncLLM, "chat_template", "{{ messages }}")
    monkeypatch.setattr(_FakeAsyncLLM, "generation_prompt", "<|assistant|>")
    return _FakeAsyncLLM


async def _started(settings: dict[str, Any] | None = None) -> tuple[VLLMEngine, _FakeAsyncLLM]:
    engine = VLLMEngine(
        ModelConfig(name="m", engine="vllm", vllm={"model": "org/m", **(settings or {})})
    )
    await engine.start()
    return engine, engine.llm


def _chat(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="m", messages=[Message("user", "hi there")], **fields)


async def test_stream_renders_the_chat_and_samples_as_asked(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    engine, llm = await _started({"dtype": "float32", "engine_args": {"max_num_seqs": 4}})
    request = _chat(max_tokens=9, temperature=0.0, top_p=0.5, seed=3, stop=["\n\n"])

    chunks = [c async for c in engine.stream(request)]

    assert vars(llm.args) == {"kwargs": engine.engine_args()}
    assert llm.args.kwargs["max_num_seqs"] == 4
    prompt, params, request_id = llm.requests[0]
    assert prompt == {"prompt_token_ids": engine.render_prompt(request)[1]}
    assert params.kwargs == {
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 3,
        "stop": ["\n\n"],
        "output_kind": _OutputKind.DELTA,
    }
    assert request_id == request.request_id
    assert [(c.kind, c.text, c.tokens, c.finish_reason) for c in chunks] == [
        ("text", "Hello", 1, None),
        ("text", " world", 2, None),
        ("text", "", 0, "stop"),
    ]
    assert chunks[-1].usage == Usage(
        prompt_tokens=len(prompt["prompt_token_ids"]), completion_tokens=3
    )
    assert llm.closed_generators == 1 and not llm.aborted

    await engine.close()
    assert llm.shut_down and engine.llm is None


async def test_think_tags_split_reasoning_from_the_answer_with_token_counts(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    fake_vllm.script = [("<thi", 1), ("nk>plan", 2), (" more</think>", 3), ("Yes", 1), ("", 1)]
    engine, _ = await _started()

    chunks = [c async for c in engine.stream(_chat())]

    assert [(c.kind, c.text, c.tokens) for c in chunks[:-1]] == [
        ("thinking", "plan", 3),  # "<thi" was held back until the tag was whole
        ("thinking", " more", 3),
        ("text", "Yes", 1),
    ]
    final = chunks[-1]
    assert (final.text, final.tokens, final.finish_reason) == ("", 1, "stop")
    assert sum(c.tokens for c in chunks) == final.usage.completion_tokens == 8  # type: ignore[union-attr]


async def test_a_template_that_opens_the_think_block_starts_in_reasoning(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    fake_vllm.generation_prompt = "<|assistant|><think>\n"
    fake_vllm.script = [("weigh it", 2), ("</think>Done", 2)]
    engine, _ = await _started()

    chunks = [c async for c in engine.stream(_chat())]

    assert [(c.kind, c.text) for c in chunks[:-1]] == [("thinking", "weigh it"), ("text", "Done")]


@pytest.mark.parametrize(("vllm_reason", "ours"), [("length", "length"), ("abort", "cancelled")])
async def test_finish_reasons_map_onto_ours(
    fake_vllm: type[_FakeAsyncLLM], vllm_reason: str, ours: str
) -> None:
    fake_vllm.reason = vllm_reason
    engine, _ = await _started()

    chunks = [c async for c in engine.stream(_chat())]

    assert chunks[-1].finish_reason == ours


async def test_closing_the_stream_early_aborts_the_request(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    fake_vllm.script = [("tok", 1)] * 50
    engine, llm = await _started()
    request = _chat()
    stream = engine.stream(request)

    assert (await anext(stream)).text == "tok"
    await stream.aclose()

    assert llm.aborted == [request.request_id]
    assert llm.closed_generators == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [(_ClientError("prompt too long"), RequestError), (RuntimeError("boom"), EngineError)],
)
async def test_vllm_errors_become_serving_errors(
    fake_vllm: type[_FakeAsyncLLM], error: Exception, expected: type[Exception]
) -> None:
    fake_vllm.fail_with = error
    engine, llm = await _started()
    request = _chat()

    with pytest.raises(expected, match=str(error)):
        [c async for c in engine.stream(request)]

    assert llm.aborted == [request.request_id]  # nothing may stay queued in vLLM


async def test_a_conversation_the_template_refuses_is_a_request_error(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    engine, llm = await _started()
    request = GenerationRequest(model="m", messages=[Message("assistant", "hello")])

    with pytest.raises(RequestError, match="must start with a user message"):
        await anext(engine.stream(request))

    assert not llm.requests


async def test_a_model_without_chat_template_fails_at_start(
    fake_vllm: type[_FakeAsyncLLM],
) -> None:
    fake_vllm.chat_template = None
    engine = VLLMEngine(ModelConfig(name="m", engine="vllm", vllm={"model": "org/base"}))

    with pytest.raises(EngineUnavailable, match="no chat template"):
        await engine.start()

    assert fake_vllm.instances[0].shut_down
    assert engine.llm is None


@pytest.mark.parametrize("keyword", ["structured_outputs", "guided_decoding"])
async def test_response_format_becomes_guided_decoding(
    fake_vllm: type[_FakeAsyncLLM], keyword: str
) -> None:
    # vLLM 0.11 renamed GuidedDecodingParams (SamplingParams' guided_decoding) to
    # StructuredOutputsParams (structured_outputs): the engine takes whichever exists.
    name = "StructuredOutputsParams" if keyword == "structured_outputs" else "GuidedDecodingParams"
    setattr(sys.modules["vllm.sampling_params"], name, _Params)
    engine, llm = await _started()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    form = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    [c async for c in engine.stream(_chat(response_format=form))]
    [c async for c in engine.stream(_chat(response_format={"type": "json_object"}))]
    [c async for c in engine.stream(_chat())]
    (_, with_schema, _), (_, with_object, _), (_, plain, _) = llm.requests
    assert with_schema.kwargs[keyword].kwargs == {"json": schema}
    assert with_object.kwargs[keyword].kwargs == {"json_object": True}
    assert keyword not in plain.kwargs
    await engine.close()
