"""Routing benchmark: the classifier and the compressor, in process.

Run from the repository root::

    .venv/bin/python bench/routing.py            # full run (a few minutes)
    .venv/bin/python bench/routing.py --quick    # smoke run
    .venv/bin/python bench/routing.py --only classifier

Scenario "classifier": the embedding classifier on the embedded all-MiniLM-L6-v2
(the offline default), configured categories, label embeddings cached: prompts/s
and latency p50/p99 one prompt at a time, then prompts/s in batches of 8 and 32
(the deployment's ``@serve.batch`` hands it such batches). Target: ≥ 200
prompts/s batched on 2 cores.

Scenario "compressor": LLMLingua on contexts of about 500 and 2,000 cl100k
tokens (generated, every sentence different) with a one-line question, at
requested ratios 0.5 and 0.3: latency, and the achieved ratio of the context
(what ``ratio`` asks for) and of the whole text (what `Compression.ratio`
reports). The default method is the original LLMLingua on the embedded
SmolLM2-135M-Instruct; ``--compressor-method llmlingua2 --compressor-model
PATH`` measures LLMLingua-2 where its model exists (it does not install from a
registry: see the tests for the random-head mechanics).

Scenario "accuracy": the embedding classifier on the labelled evaluation set
``bench/data/routing_eval.jsonl`` (see bench/_routing_eval.py), prompts the
classifier was not built from: top-1 accuracy with the configured categories, with
bare category names given per request (as ``possible_categories``), with one
category given by an unknown name (it falls back to its text), and zero-shot
(descriptions only, no examples: the old classifier) for comparison; a confusion
matrix, calibration (accuracy per confidence bucket) and the share of prompts
routed wrongly at the default ``routing.confidence_threshold``. Targets: ≥ 90%
configured, ≥ 85% bare names, wrong and routed ≤ 5%. ``--classifier-model PATH``
evaluates another sentence-transformers model.

Scenarios are entries of SCENARIOS (name -> function(args)); each loads what it
needs and prints its own table, so another (e.g. the time to first token added
by routing) is one more function. The bench only prints figures, it never
asserts timings. On a shared machine wall-clock figures swing with the
neighbours' load (printed in each header): each figure is a median, the best run
is shown next to it, and CPU-seconds show what the work itself costs. Under
heavy contention ``--threads 1`` gives steadier figures than 2.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib module torch imports: keep this
# directory off sys.path (as bench/gateway.py does).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from chatfleet.serving.config import ClassifierConfig, CompressorConfig

Scenario = Callable[[argparse.Namespace], None]

# --- inputs ----------------------------------------------------------------------------

_PROMPT_STARTS = [
    "Write a Python function that",
    "Explain why my JavaScript code",
    "What is the derivative of",
    "Solve the equation",
    "Hey, how are you doing",
    "Tell me about your favourite",
    "Summarise the following meeting notes:",
    "Give me a TL;DR of this article:",
    "Translate into French:",
    "How do you say this in German:",
]
_PROMPT_ENDS = [
    "parses a CSV file and sums the second column.",
    "x^3 + 2x over the interval from 0 to 4?",
    "today, did you have a nice weekend?",
    "the team agreed to postpone the release by two weeks and hire a tester.",
    "where is the nearest train station and how much is a ticket?",
    "returns undefined when the promise resolves late?",
    "the council voted to expand the bike lanes despite objections from shops.",
    "2x + 7 = 19 and check the answer.",
]


def bench_prompts(n: int, seed: int = 7) -> list[str]:
    """``n`` short, varied prompts (templated; deterministic)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_PROMPT_STARTS)} {rng.choice(_PROMPT_ENDS)}" for _ in range(n)]


_NAMES = ["Amira", "Bram", "Chen", "Dolores", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Jun"]
_TEAMS = ["payments", "search", "the data platform", "mobile", "support", "infrastructure"]
_METRICS = [
    "the weekly active users",
    "the p99 checkout latency",
    "the number of open incidents",
    "the cloud bill",
    "the conversion rate on the pricing page",
    "the backlog of customer tickets",
]
_CHANGES = ["risen", "fallen", "stayed flat at", "jumped", "dropped"]
_REASONS = [
    "a slow database migration that still holds a lock during peak hours",
    "the new onboarding flow that shipped at the start of the month",
    "a marketing campaign in three new countries",
    "an expired certificate that broke the partner integration for a day",
    "a change in how refunds are counted since the audit",
    "seasonal traffic ahead of the holidays",
]
_ACTIONS = [
    "asked for a written plan before the next review",
    "proposed moving two engineers from the mobile team for a sprint",
    "suggested rolling the change back until the cause is understood",
    "wants a dashboard that splits the figure by region",
    "agreed to follow up with the vendor on Thursday",
    "will draft a short note for the leadership meeting",
]


def bench_context(tokens: int, count: Callable[[str], int], seed: int = 11) -> str:
    """Meeting notes of about ``tokens`` cl100k tokens, every sentence different."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    text = ""
    while count(text) < tokens:
        sentences = []
        for _ in range(rng.randint(3, 5)):
            name, other = rng.sample(_NAMES, 2)
            sentences.append(
                f"{name} from {rng.choice(_TEAMS)} reported that {rng.choice(_METRICS)} had"
                f" {rng.choice(_CHANGES)} {rng.randint(2, 60)} percent since"
                f" {rng.choice(['Monday', 'last week', 'the March release', 'the offsite'])},"
                f" most likely because of {rng.choice(_REASONS)}; {other}"
                f" {rng.choice(_ACTIONS)}."
            )
        paragraphs.append(" ".join(sentences))
        text = "\n\n".join(paragraphs)
    shorter = "\n\n".join(paragraphs[:-1])
    if shorter and tokens - count(shorter) < count(text) - tokens:
        return shorter  # the closer of the two
    return text


# --- helpers ---------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


class _CPU:
    """CPU seconds this process used (all threads) over a ``with`` block.

    On a shared machine wall-clock rates say how busy the neighbours were;
    work per CPU-second says what the code costs (x cores = an idle machine's rate
    when it scales over them).
    """

    def __enter__(self) -> _CPU:
        self.started = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.process_time() - self.started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _header(title: str) -> None:
    import torch

    print(
        f"\n== {title}  (torch threads: {torch.get_num_threads()}, load avg: "
        f"{os.getloadavg()[0]:.1f})"
    )


# --- scenarios -------------------------------------------------------------------------


def classifier_scenario(args: argparse.Namespace) -> None:
    from chatfleet.serving.routing import create_classifier

    config = ClassifierConfig(max_batch_size=32)
    classifier = create_classifier(config)
    load_s, _ = _timed(classifier.load)
    _header(f"classifier: embedding, all-MiniLM-L6-v2, {len(config.categories)} categories")
    print(f"load: {load_s:.1f} s")

    n = 64 if args.quick else 256
    prompts = bench_prompts(n)
    classifier.classify_batch(prompts[:32])  # warm-up

    with _CPU() as cpu:
        singles = [_timed(lambda p=p: classifier.classify(p))[0] for p in prompts]
    single_rate = len(singles) / sum(singles)
    p50, p99 = (_percentile(singles, q) * 1e3 for q in (0.5, 0.99))
    print(
        f"single   : {single_rate:7.1f} prompts/s {n / cpu.seconds:7.1f} per CPU-s"
        f"   latency p50 {p50:6.1f} ms  p99 {p99:6.1f} ms   ({n} prompts)"
    )
    for size in (8, 32):
        batches = [prompts[s : s + size] for s in range(0, n, size)]
        rates, cpu_rates = [], []
        for _ in range(args.repeats):
            with _CPU() as cpu:
                elapsed = sum(_timed(lambda b=b: classifier.classify_batch(b))[0] for b in batches)
            rates.append(n / elapsed)
            cpu_rates.append(n / cpu.seconds)
        rate = statistics.median(rates)
        print(
            f"batch {size:<3}: {rate:7.1f} prompts/s {statistics.median(cpu_rates):7.1f} per CPU-s"
            f"   {size / rate * 1e3:6.1f} ms a batch ({rate / single_rate:.1f}x single;"
            f" best run {max(rates):.0f}/s; target >= 200/s)"
        )


def _routing_eval() -> Any:
    """bench/_routing_eval.py, loaded by path: this directory is off sys.path (see above)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_routing_eval", os.path.join(_HERE, "_routing_eval.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def accuracy_scenario(args: argparse.Namespace) -> None:
    evaluation = _routing_eval()
    Outcome, load_eval = evaluation.Outcome, evaluation.load_eval

    from chatfleet.serving.config import RoutingConfig
    from chatfleet.serving.routing import create_classifier

    samples = load_eval()
    threshold = RoutingConfig().confidence_threshold
    config = ClassifierConfig(max_batch_size=32, model=args.classifier_model)
    classifier = create_classifier(config)
    load_s, _ = _timed(classifier.load)
    names = [c.name for c in config.categories]
    model = args.classifier_model or "all-MiniLM-L6-v2"
    _header(f"accuracy: embedding, {model}, {len(samples)} held-out prompts")
    fitted = getattr(classifier, "example_temperature", None)
    print(f"load: {load_s:.1f} s (fitted temperature {fitted})")
    prompts = [s.prompt for s in samples]
    classifier.classify_batch(prompts[:32])  # warm-up: the first forward pass is slow

    def run(title: str, labels: list[str] | None, clf: Any = classifier) -> Outcome:
        with _CPU() as cpu:
            elapsed, results = _timed(lambda: clf.classify_batch(prompts, labels))
        outcome = Outcome(
            samples, [r.labels[0] for r in results], [r.scores[0] for r in results], names
        )
        outcome.print_summary(title, threshold)
        print(
            f"  {elapsed / len(prompts) * 1e3:.1f} ms a prompt in batches of 32"
            f" ({cpu.seconds / len(prompts) * 1e3:.1f} CPU-ms)"
        )
        return outcome

    configured = run("configured categories", None)
    configured.print_confusion()
    configured.print_calibration()
    print("  misses:")
    configured.print_misses(12 if args.quick else 40)
    bare = run("bare names (possible_categories)", names)
    bare.print_calibration()
    # One category the config does not know (its examples are not used): its text decides.
    renamed = [*names[:-1], "translate"]
    unknown = run(f"bare names, {names[-1]!r} given as unknown 'translate'", renamed)
    unknown.predicted = [names[-1] if p == "translate" else p for p in unknown.predicted]
    print(f"  top-1 with the unknown name counted as {names[-1]}: {unknown.accuracy():.3f}")
    zero_shot = create_classifier(config.model_copy(update={"builtin_examples": False}))
    zero_shot.load()
    zero_shot.classify_batch(prompts[:32])
    run(
        "zero-shot: descriptions, no examples (before examples)", None, zero_shot
    ).print_calibration()
    print(
        f"targets: configured >= 90% ({configured.accuracy():.1%}), bare names >= 85%"
        f" ({bare.accuracy():.1%}), wrong and routed <= 5% ({configured.above(threshold)[1]:.1%})"
    )


def compressor_scenario(args: argparse.Namespace) -> None:
    from chatfleet.serving.routing import Compressor

    config = CompressorConfig(
        method=args.compressor_method, model=args.compressor_model, min_tokens=0
    )
    compressor = Compressor(config)
    load_s, _ = _timed(compressor.load)
    _header(f"compressor: {config.method}, {compressor.model_path()}")
    print(f"load: {load_s:.1f} s")

    question = "Question: which metric got worse, and what did the team decide to do?"
    sizes = (500,) if args.quick else (500, 2000)
    ratios = (0.5,) if args.quick else (0.5, 0.3)
    repeats = 1 if args.quick else args.repeats
    print(
        f"{'tokens':>7} {'asked':>6} {'context':>8} {'whole':>6} {'latency':>9}"
        f" {'CPU':>9} {'tokens/s':>9}   (kept/original in cl100k tokens; median of {repeats})"
    )
    for size in sizes:
        context = bench_context(size, compressor.count_tokens)
        context_tokens = compressor.count_tokens(context)
        for ratio in ratios:
            latencies, cpu_seconds = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                with _CPU() as cpu:
                    result = compressor.compress(context, question, ratio)
                latencies.append(time.perf_counter() - started)
                cpu_seconds.append(cpu.seconds)
            assert result.text.endswith(question), "the question must survive verbatim"
            kept_context = result.text.removesuffix(question).rstrip()
            achieved = compressor.count_tokens(kept_context) / context_tokens
            latency = statistics.median(latencies)
            print(
                f"{context_tokens:>7} {ratio:>6.2f} {achieved:>8.2f} {result.ratio:>6.2f}"
                f" {latency:>8.2f}s {statistics.median(cpu_seconds):>8.2f}s"
                f" {context_tokens / latency:>9.0f}   best {min(latencies):.2f}s"
            )


def routing_ttft_scenario(args: argparse.Namespace) -> None:
    """Time to first token with ``model: auto`` (classify + decide) vs a named model.

    Both go through the ingress's own code path (`Gateway`) in one process with the
    fake engine at zero delay, so the difference is what routing adds: the real
    MiniLM classification of the prompt and the decision. Under Ray Serve the
    router and classifier are separate replicas: add about two handle hops.
    """
    import asyncio

    from chatfleet.serving.api import LocalEngineClient, LocalRouterClient, create_app
    from chatfleet.serving.api._schemas import SamplingFields
    from chatfleet.serving.config import AppConfig
    from chatfleet.serving.engines.fake import FakeEngine
    from chatfleet.serving.protocol import Message
    from chatfleet.serving.routing import Router, create_classifier

    fake = {"reply_tokens": 16}
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": "general", "engine": "fake", "fake": fake},
                {"name": "coder", "engine": "fake", "fake": fake},
                {"name": "mathematician", "engine": "fake", "fake": fake},
            ],
            "classifier": {},
            "routing": {
                "routes": [
                    {"category": "coding", "model": "coder"},
                    {"category": "maths", "model": "mathematician"},
                ],
                "compress": False,
            },
            "auth": {"enabled": False},
        }
    )
    assert config.classifier is not None
    classifier = create_classifier(config.classifier)
    classifier.load()
    _header("routing: time to first token, model auto vs a named model (in process)")

    async def run() -> None:
        async def classify(prompt: str) -> Any:
            return (await asyncio.to_thread(classifier.classify_batch, [prompt]))[0]

        engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
        for engine in engines.values():
            await engine.start()
        app = create_app(config, engines, router=LocalRouterClient(Router(config, classify)))
        gw = app.state.gateway
        sampling = SamplingFields()

        async def named(prompt: str) -> float:
            started = time.perf_counter()
            request = gw.generation_request(
                gw.resolve("general"), [Message("user", prompt)], sampling
            )
            stream = await gw.open_stream(request, accepted_at=started)
            elapsed = time.perf_counter() - started
            await stream.aclose()
            return elapsed

        async def auto(prompt: str) -> float:
            started = time.perf_counter()
            decision = await gw.decide([Message("user", prompt)])
            _, _, stream = await gw.open_routed(decision, sampling, started)
            elapsed = time.perf_counter() - started
            await stream.aclose()
            return elapsed

        prompts = bench_prompts(64 if args.quick else 256)
        for prompt in prompts[:16]:  # warm-up both paths
            await named(prompt)
            await auto(prompt)
        named_s, auto_s = [], []
        for prompt in prompts:  # interleaved, so both see the same neighbours
            named_s.append(await named(prompt))
            auto_s.append(await auto(prompt))
        for label, values in (("named model", named_s), ("model auto", auto_s)):
            p50, p99 = (_percentile(values, q) * 1e3 for q in (0.5, 0.99))
            print(
                f"{label:<12}: TTFT p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({len(values)} requests)"
            )
        added = [a - n for a, n in zip(auto_s, named_s, strict=True)]
        p50 = _percentile(added, 0.5) * 1e3
        verdict = "met" if p50 <= 30 else "MISSED"
        print(f"added by routing: p50 {p50:.2f} ms (target <= 30 ms p50: {verdict})")

    asyncio.run(run())


def routing_ttft_ray_scenario(args: argparse.Namespace) -> None:
    """The same comparison through real Ray Serve and HTTP: router and classifier
    are replicas of their own, so routing adds two handle hops as well."""
    import json as _json
    import socket

    import httpx
    import ray
    from ray import serve

    from chatfleet.serving.app import build_app
    from chatfleet.serving.config import AppConfig

    fake = {"reply_tokens": 8}
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": "general", "engine": "fake", "fake": fake},
                {"name": "coder", "engine": "fake", "fake": fake},
            ],
            "classifier": {},
            "routing": {"routes": [{"category": "coding", "model": "coder"}], "compress": False},
            "auth": {"enabled": False},
        }
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(config),
            name="bench",
            route_prefix="/",
            logging_config={"enable_access_log": False},
        )
        _header("routing: time to first token over Ray Serve + HTTP, auto vs named")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def ttft(client: httpx.Client, model: str, prompt: str) -> float:
            body = {
                "model": model,
                "stream": True,
                "messages": [{"role": "user", "content": prompt}],
            }
            started = time.perf_counter()
            first: float | None = None
            with client.stream("POST", url, json=body) as response:
                for line in response.iter_lines():  # read to the end: keep-alive reuse
                    if first is not None or not line.startswith("data: {"):
                        continue
                    choices = _json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - started
            if first is not None:
                return first
            raise RuntimeError("no content")

        prompts = bench_prompts(40 if args.quick else 160)
        named_s, auto_s = [], []
        with httpx.Client(timeout=60) as client:
            for prompt in prompts[:10]:
                ttft(client, "general", prompt)
                ttft(client, "auto", prompt)
            for prompt in prompts:
                named_s.append(ttft(client, "general", prompt))
                auto_s.append(ttft(client, "auto", prompt))
        for label, values in (("named model", named_s), ("model auto", auto_s)):
            p50, p99 = (_percentile(values, q) * 1e3 for q in (0.5, 0.99))
            print(
                f"{label:<12}: TTFT p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({len(values)} requests)"
            )
        added = [a - n for a, n in zip(auto_s, named_s, strict=True)]
        p50 = _percentile(added, 0.5) * 1e3
        verdict = "met" if p50 <= 30 else "MISSED"
        print(f"added by routing: p50 {p50:.2f} ms (target <= 30 ms p50: {verdict})")
    finally:
        ray.shutdown()


SCENARIOS: dict[str, Scenario] = {
    "classifier": classifier_scenario,
    "compressor": compressor_scenario,
    "routing-ttft": routing_ttft_scenario,
    "routing-ttft-ray": routing_ttft_ray_scenario,
    # Last: it loads two classifiers, which slows whatever runs after it in this process.
    "accuracy": accuracy_scenario,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, sizes and ratios")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--compressor-method", choices=["llmlingua", "llmlingua2"], default="llmlingua"
    )
    parser.add_argument(
        "--compressor-model", default=None, help="hub id or folder (default: the method's)"
    )
    parser.add_argument(
        "--classifier-model",
        default=None,
        help="sentence-transformers folder for accuracy (default: the embedded MiniLM)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"routing bench: {', '.join(names)}{' (quick)' if args.quick else ''}")
    for name in names:
        SCENARIOS[name](args)


if __name__ == "__main__":
    main()
