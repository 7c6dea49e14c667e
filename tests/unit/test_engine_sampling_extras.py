"""The transformers engine honours a request's repetition_penalty (its one sampling extra).

On the tiny random Llama of test_engine_transformers.py: greedy decoding repeats
tokens, which a strong penalty changes.
"""

from __future__ import annotations

from tests.unit.test_engine_transformers import (  # noqa: F401 - fixtures
    collect,
    engine,
    request,
    tiny_model_dir,
    tokenizer,
)

from chatfleet.serving.engines.hf_transformers import TransformersEngine


async def test_a_requests_repetition_penalty_overrides_the_configured_one(
    engine: TransformersEngine,  # noqa: F811 - the imported fixture
) -> None:
    def text(chunks: list) -> str:  # type: ignore[type-arg]
        return "".join(c.text for c in chunks)

    configured = text(await collect(engine, request(max_tokens=24)))  # penalty 1.2
    assert configured == text(await collect(engine, request(max_tokens=24)))  # greedy
    unpenalised = request(max_tokens=24, sampling={"repetition_penalty": 1.0})
    looping = text(await collect(engine, unpenalised))
    assert looping != configured
    words = looping.split()
    assert len(set(words)) < len(words)  # without the penalty the tiny model repeats itself
