"""chatfleet's models on the fake upstream servers (`FakeOpenAIServer`,
`FakeOllamaServer`), and an engine client no request may reach."""

from __future__ import annotations

from typing import Any

from tests.fakes.ollama_server import FakeOllamaServer
from tests.fakes.openai_server import FakeOpenAIServer

from chatfleet.serving.config import ModelConfig


def remote_models(
    openai_upstream: FakeOpenAIServer, ollama_upstream: FakeOllamaServer
) -> list[ModelConfig]:
    """``remote`` (the openai engine, streaming) and ``local`` (the ollama engine)."""
    return [
        ModelConfig(
            name="remote",
            engine="openai",
            openai={"base_url": openai_upstream.base_url, "model": "gpt-test", "max_retries": 0},
        ),
        ModelConfig(
            name="local",
            engine="ollama",
            ollama={"base_url": ollama_upstream.url, "model": "qwen3:0.6b"},
        ),
    ]


class NeverReached:
    """An engine client for requests that must be refused before any engine sees them."""

    def batches(self, request: Any) -> Any:
        raise AssertionError("a refused request reached the engine")

    async def is_ready(self) -> bool:
        return True
