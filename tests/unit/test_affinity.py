"""Conversation affinity: the key the ingress gives a request, and the replica Ray
Serve's router (`AffinityRouter`, run here on Serve's real routing loop over stub
replicas) sends it to."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from chatfleet.serving.api import Metrics, create_app
from chatfleet.serving.api._affinity import affinity_key
from chatfleet.serving.api._clients import LocalEngineClient
from chatfleet.serving.app._affinity import AffinityRouter, rendezvous_order
from chatfleet.serving.app._build import engine_options
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, WireRequest

TWO = ModelConfig(name="f", engine="fake", num_replicas=2)
SYSTEM = Message("system", "You are terse.")


def turns(first: str, count: int) -> list[list[Message]]:
    """The histories an OpenAI client sends for ``count`` turns of one chat."""
    history = [SYSTEM, Message("user", first)]
    sent = []
    for i in range(count):
        sent.append(list(history))
        history += [Message("assistant", f"answer {i}"), Message("user", f"and then {i}?")]
    return sent


# ---- the key ---------------------------------------------------------------------------


def test_affinity_is_on_with_several_replicas_only() -> None:
    assert not ModelConfig(name="f", engine="fake").routes_by_affinity()
    assert TWO.routes_by_affinity()
    scaled = ModelConfig(name="f", engine="fake", autoscaling={"max_replicas": 3})
    assert scaled.routes_by_affinity()
    assert not ModelConfig(
        name="f", engine="fake", num_replicas=2, affinity={"enabled": False}
    ).routes_by_affinity()
    assert ModelConfig(name="f", engine="fake", affinity={"enabled": True}).routes_by_affinity()
    assert affinity_key(ModelConfig(name="f", engine="fake"), turns("hi", 1)[0]) == ""


def test_every_turn_of_a_chat_has_the_key_of_its_first() -> None:
    keys = {affinity_key(TWO, history) for history in turns("plan a trip to Lyon", 5)}
    assert len(keys) == 1 and "" not in keys
    assert affinity_key(TWO, turns("plan a trip to Nice", 1)[0]) not in keys


def test_a_conversation_id_keys_by_id_and_owner() -> None:
    first, later = turns("hello", 1)[0], [Message("user", "something else entirely")]
    assert affinity_key(TWO, first, ("alice", "c1")) == affinity_key(TWO, later, ("alice", "c1"))
    assert affinity_key(TWO, first, ("alice", "c1")) != affinity_key(TWO, first, ("bob", "c1"))
    assert affinity_key(TWO, first, ("alice", "c1")) != affinity_key(TWO, first)


def test_prompts_on_one_long_system_prompt_share_a_key() -> None:
    model = ModelConfig(name="f", engine="fake", num_replicas=2, affinity={"prefix_chars": 64})
    manual = Message("system", "Answer from this manual. " * 20)
    one = affinity_key(model, [manual, Message("user", "how do I reset it?")])
    other = affinity_key(model, [manual, Message("user", "what is the warranty?")])
    assert one == other
    short = [Message("system", "Be brief."), Message("user", "how do I reset it?")]
    assert affinity_key(model, short) != affinity_key(
        model, [short[0], Message("user", "what is the warranty?")]
    )


class _Recording(LocalEngineClient):
    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.keys: list[str] = []

    def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        self.keys.append(request.affinity_key)
        return super().batches(request)


async def test_the_ingress_keys_requests_by_conversation_header_or_prefix() -> None:
    client = _Recording(FakeEngine(TWO))
    await client.start()
    config = AppConfig(models=[TWO], auth={"enabled": False})
    app = create_app(config, {"f": client}, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chatfleet") as http:
        for history in turns("plan a trip", 2):
            messages = [{"role": m.role, "content": m.content} for m in history]
            body = {"model": "f", "messages": messages, "max_tokens": 4}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            headers = {"x-chatfleet-conversation-id": "c7"}
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200
    by_prefix, by_id = client.keys[0::2], client.keys[1::2]
    assert by_prefix == [affinity_key(TWO, turns("plan a trip", 1)[0])] * 2
    # The id, not the messages: the same key each turn, and not the prefix's.
    assert by_id[0] == by_id[1] != by_prefix[0]


# ---- rendezvous hashing ----------------------------------------------------------------


KEYS = [f"key-{i}" for i in range(2000)]


def owners(replicas: list[str]) -> dict[str, str]:
    return {key: rendezvous_order(key, replicas)[0] for key in KEYS}


def test_keys_spread_evenly_and_deterministically() -> None:
    before = owners(["a", "b"])
    assert before == owners(["b", "a"])
    share = sum(owner == "a" for owner in before.values()) / len(KEYS)
    assert 0.45 < share < 0.55


def test_a_new_replica_takes_its_share_and_moves_no_other_key() -> None:
    before = owners(["a", "b", "c", "d"])
    after = owners(["a", "b", "c", "d", "e"])
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "e" for key in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # about 1/5


def test_a_replica_gone_moves_its_keys_only() -> None:
    before = owners(["a", "b", "c"])
    after = owners(["a", "c"])
    assert all(after[key] == before[key] for key in KEYS if before[key] != "b")


# ---- the router, on Serve's routing loop -----------------------------------------------


DEPLOYMENT = DeploymentID(name="engine-f", app_name="test")


class StubReplica:
    """What Serve's routing loop asks of a replica: its id, capacity and load."""

    def __init__(self, unique_id: str, capacity: int = 4) -> None:
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.max_ongoing_requests = capacity
        self.load = 0
        self.node_id = None
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.load


_ids = itertools.count()


class Routing:
    def __init__(self, replicas: int, **kwargs: Any) -> None:
        self.router = AffinityRouter(
            deployment_id=DEPLOYMENT,
            handle_source=DeploymentHandleSource.UNKNOWN,
            use_replica_queue_len_cache=True,
        )
        self.router.initialize_state(model="f", **kwargs)
        self.replicas = {f"r{i}": StubReplica(f"r{i}") for i in range(replicas)}
        self.router.update_replicas(list(self.replicas.values()))  # type: ignore[arg-type]

    def load(self, replica: str, load: int) -> None:
        self.replicas[replica].load = load
        self.router.on_new_queue_len_info(self.replicas[replica].replica_id, load)

    async def route(self, key: str) -> str:
        """The replica Serve's loop picks for a request keyed ``key``, as the handle
        would (it reports the routing back to the router)."""
        request_id = str(next(_ids))
        pending = PendingRequest(
            # As the ingress's handle call sends it.
            args=[WireRequest.of(GenerationRequest(model="f", messages=[], affinity_key=key))],
            kwargs={},
            metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id),
        )
        replica = await asyncio.wait_for(self.router._choose_replica_for_request(pending), 30)
        self.router.on_request_routed(pending, replica.replica_id, None)
        # Serve may have left probes of the other replicas running: let them land
        # before a test changes a load (a late one would overwrite it).
        await asyncio.sleep(0.01)
        return replica.replica_id.unique_id


async def test_requests_of_one_key_land_on_one_replica_and_keys_spread() -> None:
    routing = Routing(3)
    for key in ("conversation-1", "conversation-2"):
        chosen = {await routing.route(key) for _ in range(8)}
        assert chosen == {rendezvous_order(key, routing.replicas)[0]}
    spread = {await routing.route(f"conversation-{i}") for i in range(30)}
    assert spread == set(routing.replicas)
    assert routing.router.outcomes == {"hit": 46}


async def test_a_full_replica_sends_its_keys_elsewhere_until_it_has_room() -> None:
    routing = Routing(3)
    preferred = rendezvous_order("chat", routing.replicas)[0]
    routing.load(preferred, 4)  # at max_ongoing_requests
    elsewhere = {await routing.route("chat") for _ in range(6)}
    assert preferred not in elsewhere
    routing.load(preferred, 3)
    assert await routing.route("chat") == preferred
    assert routing.router.outcomes == {"miss": 6, "hit": 1}


async def test_while_every_replica_is_full_a_request_takes_whichever_frees_first() -> None:
    routing = Routing(2)
    preferred = rendezvous_order("chat", routing.replicas)[0]
    for replica in routing.replicas:
        routing.load(replica, 4)
    waiting = asyncio.create_task(routing.route("chat"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    routing.replicas[preferred].load = 3  # one finished: Serve's next probe sees it
    # Under the 10 s after which Serve forgets a count (and would try the key's replica
    # again anyway); its backoff between passes is at most 0.5 s.
    assert await asyncio.wait_for(waiting, 6) == preferred


async def test_a_replica_full_unbeknown_to_the_router_is_probed_and_passed() -> None:
    routing = Routing(2)
    preferred = rendezvous_order("chat", routing.replicas)[0]
    routing.replicas[preferred].load = 4  # no count of it yet: Serve's probe finds it full
    assert await routing.route("chat") != preferred
    assert routing.router.outcomes == {"miss": 1}


async def test_max_imbalance_leaves_a_busy_replica_before_it_is_full() -> None:
    routing = Routing(2, max_imbalance=2)
    preferred = rendezvous_order("chat", routing.replicas)[0]
    other = next(r for r in routing.replicas if r != preferred)
    routing.load(other, 0)
    routing.load(preferred, 2)
    assert await routing.route("chat") == other
    routing.load(other, 1)
    assert await routing.route("chat") == preferred


async def test_requests_without_a_key_spread_over_the_replicas() -> None:
    routing = Routing(2)
    assert {await routing.route("") for _ in range(40)} == {"r0", "r1"}
    assert routing.router.outcomes == {}


def test_engine_options_route_by_affinity_with_several_replicas() -> None:
    from chatfleet.serving.app import EngineDeployment

    deployment: Any = EngineDeployment
    # One replica: Serve's default router, with the request sent ahead on the relay link.
    single = engine_options(ModelConfig(name="f", engine="fake"))
    config = deployment.options(**single)._deployment_config.request_router_config
    assert config.request_router_class.endswith("_offers.DefaultRouter")
    model = ModelConfig(name="f", engine="fake", num_replicas=2, affinity={"max_imbalance": 8})
    options = engine_options(model)
    config = deployment.options(**options)._deployment_config.request_router_config
    assert config.request_router_class.endswith("AffinityRouter")
    assert config.request_router_kwargs == {"model": "f", "max_imbalance": 8}


@pytest.mark.parametrize("prefix_chars", [0, 10**7])
def test_bad_affinity_settings_are_refused(prefix_chars: int) -> None:
    with pytest.raises(ValueError, match="prefix_chars"):
        ModelConfig(name="f", engine="fake", affinity={"prefix_chars": prefix_chars})
