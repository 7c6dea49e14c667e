"""Engines: one async-generator contract over fake, transformers, vLLM, Ollama, OpenAI.

`create_engine` imports an engine's module only when a model uses it, so a
server with only remote models never imports torch, and a missing optional
dependency is reported as `EngineUnavailable` naming the extra to install.
"""

from __future__ import annotations

import importlib

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._coalesce import coalesce, delay_for_load
from chatfleet.serving.engines._thinking import ThinkSplitter
from chatfleet.serving.engines._tracing import traced_generation

__all__ = [
    "Engine",
    "ThinkSplitter",
    "coalesce",
    "create_engine",
    "delay_for_load",
    "traced_generation",
]

_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "fake": ("chatfleet.serving.engines.fake", "FakeEngine"),
    "transformers": ("chatfleet.serving.engines.hf_transformers", "TransformersEngine"),
    "vllm": ("chatfleet.serving.engines.vllm_async", "VLLMEngine"),
    "ollama": ("chatfleet.serving.engines.ollama", "OllamaEngine"),
    "openai": ("chatfleet.serving.engines.openai_api", "OpenAIEngine"),
}


def create_engine(model: ModelConfig) -> Engine:
    """Instantiate (not start) the engine for ``model``."""
    module_name, class_name = _IMPLEMENTATIONS[model.engine]
    module = importlib.import_module(module_name)
    engine: Engine = getattr(module, class_name)(model)
    return engine
