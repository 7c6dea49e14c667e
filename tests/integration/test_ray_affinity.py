"""Conversation affinity on real Ray Serve: two replicas of a fake engine that answers
with its process id; every turn of a conversation lands on one replica, and the
conversations spread over both (`chatfleet.serving.app._affinity`)."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

CONVERSATIONS = 12
TURNS = 4


@pytest.fixture(scope="module")
def client(ray_serve: Any) -> openai.OpenAI:
    config = AppConfig(
        auth={"enabled": False},
        models=[
            ModelConfig(
                name="fake",
                engine="fake",
                num_replicas=2,  # affinity is on by default with several replicas
                fake={"report_process": True},
            )
        ],
    )
    url = ray_serve.deploy(config, "affinity")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)


def served_by(client: openai.OpenAI, messages: list[Any], **extra: Any) -> str:
    """The replica (its process id) that answered."""
    answer = client.chat.completions.create(model="fake", messages=messages, **extra)
    text = answer.choices[0].message.content or ""
    assert text.startswith("pid "), text
    return text


def chat(client: openai.OpenAI, topic: str, **extra: Any) -> list[str]:
    """One conversation of TURNS turns, resending its history as OpenAI clients do."""
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"tell me about {topic}"},
    ]
    replicas = []
    for turn in range(TURNS):
        replica = served_by(client, messages, **extra)
        replicas.append(replica)
        messages += [
            {"role": "assistant", "content": replica},
            {"role": "user", "content": f"and more, {turn}?"},
        ]
    return replicas


def test_turns_of_a_conversation_land_on_one_replica(client: openai.OpenAI) -> None:
    first_replicas = set()
    for i in range(CONVERSATIONS):
        replicas = chat(client, f"topic {i}")
        assert len(set(replicas)) == 1, f"conversation {i} moved: {replicas}"
        first_replicas.add(replicas[0])
    # With 12 keys on 2 replicas, all on one would be a 1-in-2048 chance.
    assert len(first_replicas) == 2


def test_a_conversation_id_keeps_its_replica_whatever_the_messages(
    client: openai.OpenAI,
) -> None:
    for i in range(4):
        headers = {"x-chatfleet-conversation-id": f"conversation-{i}"}
        replicas = {
            served_by(
                client, [{"role": "user", "content": f"unrelated {turn}"}], extra_headers=headers
            )
            for turn in range(TURNS)
        }
        assert len(replicas) == 1


def routed_hits() -> float:
    """``chatfleet_affinity_total{outcome="hit"}`` of this app, as Ray's agent exports it."""
    import httpx
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_chatfleet_affinity_total{")
        and 'application="affinity"' in line
        and 'model="fake"' in line
        and 'outcome="hit"' in line
    )


def test_the_router_counts_its_hits(client: openai.OpenAI) -> None:
    before = routed_hits()
    chat(client, "counting")
    deadline = time.monotonic() + 60  # Ray's agent exports every 10 s
    while routed_hits() < before + TURNS and time.monotonic() < deadline:
        time.sleep(1)
    assert routed_hits() >= before + TURNS
