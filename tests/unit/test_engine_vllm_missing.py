"""Without vLLM installed, the vllm engine fails clearly, naming the extra to install."""

from __future__ import annotations

import importlib.util

import pytest

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines.vllm_async import VLLMEngine
from chatfleet.serving.errors import EngineUnavailable
from chatfleet.serving.protocol import GenerationRequest, Message

# find_spec alone is not enough: with tests/ on sys.path, the tests/vllm folder is a
# namespace package "vllm" (no origin). Only a real vLLM makes this test moot.
_spec = importlib.util.find_spec("vllm")
if _spec is not None and _spec.origin is not None:
    pytest.skip("vLLM is installed here (tests/vllm exercise it)", allow_module_level=True)


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
