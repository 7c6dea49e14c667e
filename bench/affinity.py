"""Affinity benchmark: how often a conversation's turns land on its first replica.

Run from the repository root::

    .venv/bin/python bench/affinity.py             # about 2 minutes
    .venv/bin/python bench/affinity.py --conversations 40 --turns 8

One Ray Serve application (Serve's throughput mode, as ``chatfleet serve`` runs it)
serves two models side by side, each two replicas of the fake engine answering with
its process id (``fake.report_process``), so the client sees which replica served
every turn: ``affine`` routes by conversation affinity (`AffinityRouter`, the default
with several replicas), ``default`` by Ray Serve's own router (``affinity.enabled:
false``). Every conversation resends its whole history each turn, as OpenAI clients
do, with no conversation id: the key is the conversation's opening.

Two scenarios, each run on both models in the same application:

* ``idle``: conversations one turn after the other, replicas never busy.
* ``saturated``: all conversations at once, each replica admitting only
  ``--max-ongoing`` requests and the fake decoding 50 tokens/s: a key's replica is
  often full, so turns fall back to the less loaded replica (a miss, but no wait).

Reported per model: the affinity rate (turns after the first that landed on the
replica of the conversation's first turn), how the conversations' first turns split
over the replicas, request latency p50/p99, and what the router itself counted
(``chatfleet_affinity_total`` from Ray's metrics agent, when it exported in time).
The bench prints figures, it asserts nothing; ``--out`` keeps them as JSON.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# Scripts in bench/ may be named like stdlib modules (bench/operator.py): keep this
# directory off sys.path so that they do not shadow the standard library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import json
import re
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

MODELS = ("affine", "default")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    """What one model's conversations saw in one scenario."""

    replicas: list[list[str]] = field(default_factory=list)  # per conversation, per turn
    latencies: list[float] = field(default_factory=list)

    def affinity_rate(self) -> float:
        later = [(turns[0], r) for turns in self.replicas for r in turns[1:]]
        return sum(first == r for first, r in later) / len(later) if later else 0.0

    def first_split(self) -> list[int]:
        return sorted(Counter(turns[0] for turns in self.replicas).values(), reverse=True)

    def summary(self) -> dict[str, Any]:
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "affinity_rate": round(self.affinity_rate(), 3),
            "first_turn_split": self.first_split(),
            "replicas_seen": len({r for turns in self.replicas for r in turns}),
            "latency_p50_ms": round(statistics.median(ms), 1),
            "latency_p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
        }


async def conversation(
    http: httpx.AsyncClient, model: str, index: int, turns: int, result: Result
) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a terse assistant. " * 8},
        {"role": "user", "content": f"Conversation {index}: tell me about topic {index}."},
    ]
    served = []
    for turn in range(turns):
        started = time.perf_counter()
        response = await http.post(
            "/v1/chat/completions", json={"model": model, "messages": messages}
        )
        result.latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        served.append(answer.split()[1] if answer.startswith("pid ") else "?")
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"And then, turn {turn}?"},
        ]
    result.replicas.append(served)


async def scenario(
    url: str, model: str, conversations: int, turns: int, *, concurrent: bool
) -> Result:
    result = Result()
    limits = httpx.Limits(max_connections=conversations)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        runs = [conversation(http, model, i, turns, result) for i in range(conversations)]
        if concurrent:
            await asyncio.gather(*runs)
        else:
            for run in runs:
                await run
    return result


def app_config(max_ongoing: int) -> Any:
    from chatfleet.serving.config import AppConfig, ModelConfig

    def model(name: str, affinity: bool, saturated: bool) -> ModelConfig:
        fake: dict[str, Any] = {"report_process": True}
        if saturated:
            fake |= {"tokens_per_second": 50, "reply_tokens": 20}
        return ModelConfig(
            name=name,
            engine="fake",
            num_replicas=2,
            num_cpus=0.1,
            fake=fake,
            affinity={"enabled": affinity},
            max_ongoing_requests=max_ongoing if saturated else None,
            # A full pair of replicas holds the rest of the burst rather than refusing it.
            admission={"max_queued_requests": 1000, "max_queue_wait_s": 120},
        )

    return AppConfig(
        auth={"enabled": False},
        models=[
            model(f"{name}-{kind}", name == "affine", kind == "saturated")
            for kind in ("idle", "saturated")
            for name in MODELS
        ],
    )


def router_counts(models: list[str], deadline_s: float) -> dict[str, dict[str, float]]:
    """``ray_chatfleet_affinity_total`` of ``models`` as Ray's metrics agent exports it
    (every 10 s by default), once each of them has a series or at ``deadline_s``."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    series = re.compile(r"^ray_chatfleet_affinity_total\{([^}]*)\} ([0-9.e+]+)$", re.M)
    end = time.monotonic() + deadline_s
    counts: dict[str, dict[str, float]] = {}
    while time.monotonic() < end and set(counts) != set(models):
        time.sleep(2)
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            continue
        counts = {}
        for labels, value in series.findall(text):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            outcomes = counts.setdefault(tags["model"], {})
            outcomes[tags["outcome"]] = outcomes.get(tags["outcome"], 0) + float(value)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-ongoing", type=int, default=4, help="per replica, saturated")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    import ray
    from ray import serve

    from chatfleet.serving.app import build_app
    from chatfleet.serving.cli import serve_environment

    env, front = serve_environment(os.environ)
    os.environ.update(env)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    figures: dict[str, Any] = {"front": front, "args": vars(args)}
    try:
        started = time.perf_counter()
        serve.run(build_app(app_config(args.max_ongoing)), name="affinity", route_prefix="/")
        print(f"deployed in {time.perf_counter() - started:.0f} s ({front})", flush=True)
        url = f"http://127.0.0.1:{port}"
        for kind in ("idle", "saturated"):
            for name in MODELS:
                model = f"{name}-{kind}"
                result = asyncio.run(
                    scenario(
                        url, model, args.conversations, args.turns, concurrent=kind == "saturated"
                    )
                )
                figures[model] = result.summary()
                print(f"{model:>18}: {json.dumps(figures[model])}", flush=True)
        affine = [f"affine-{kind}" for kind in ("idle", "saturated")]
        figures["router_counts"] = router_counts(affine, deadline_s=40)
        print(f"router counted (chatfleet_affinity_total): {figures['router_counts']}")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
