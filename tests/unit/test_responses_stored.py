"""Stored responses driven by the official ``openai`` client over real uvicorn, on SQLite
and PostgreSQL: ``DELETE /v1/responses/{id}`` (and what it leaves of responses built on
the deleted one), ``GET /v1/responses/{id}/input_items`` (OpenAI's list, its pages and
its 400s), and a response whose server stopped mid-answer read back as ``failed``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.app_server import serving
from tests.fakes.chat_app import fake_model
from tests.unit.test_responses import WEATHER, Served, served

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.api._responses_stored import STOPPED
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.store import Store

__all__ = ["served"]  # the fixture, shared with test_responses


def _text(item: Any) -> str:
    """A listed message item's text (its one part)."""
    (part,) = item.model_dump()["content"]
    return str(part["text"])


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    return dict(body["error"])


async def test_a_deleted_response_is_gone_for_its_owner_only(served: Served) -> None:
    first = await served.alice.responses.create(model="fake", input="My name is Ada.")

    with pytest.raises(openai.NotFoundError) as bobs:
        await served.bob.responses.delete(first.id)  # another client's: as unknown
    assert _error(bobs.value)["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        await served.alice.responses.delete("resp_unknown")

    raw = await served.alice.responses.with_raw_response.delete(first.id)
    assert raw.http_response.status_code == 200
    assert raw.http_response.json() == {
        "id": first.id,
        "object": "response.deleted",
        "deleted": True,
    }
    with pytest.raises(openai.NotFoundError):
        await served.alice.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as continued:
        await served.alice.responses.create(
            model="fake", input="Again.", previous_response_id=first.id
        )
    assert _error(continued.value)["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        await served.alice.responses.delete(first.id)  # once
    # Its conversation went with it: nothing of it is left in the store.
    assert await served.store.list_conversations(owner="alice") == []


async def test_responses_built_on_a_deleted_one_keep_their_content(served: Served) -> None:
    first = await served.alice.responses.create(model="fake", input="My name is Ada.")
    second = await served.alice.responses.create(
        model="fake", input="Say it again.", previous_response_id=first.id
    )
    branch = await served.alice.responses.create(
        model="fake", input="Another branch.", previous_response_id=first.id
    )

    await served.alice.responses.delete(first.id)
    await served.alice.responses.delete(branch.id)

    kept = await served.alice.responses.retrieve(second.id)
    assert kept.status == "completed" and kept.output_text == second.output_text
    items = [i async for i in served.alice.responses.input_items.list(second.id)]
    assert [_text(i) for i in items if i.type == "message"] == ["Say it again."]
    # Still continued with its whole chain, the deleted response's turn included...
    await served.alice.responses.create(
        model="fake", input="And once more.", previous_response_id=second.id
    )
    assert [m.content for m in served.last_request().messages] == [
        "My name is Ada.",
        first.output_text,
        "Say it again.",
        second.output_text,
        "And once more.",
    ]
    # ...but the branch nothing was built on is gone from the conversation.
    (conversation,) = await served.store.list_conversations(owner="alice")
    said = [m.content for m in await served.store.messages(conversation.id)]
    assert "Another branch." not in said and branch.output_text not in said
    assert "My name is Ada." in said


async def test_input_items_are_the_responses_own_input_a_page_at_a_time(
    served: Served,
) -> None:
    first = await served.alice.responses.create(model="fake", input="First turn.")
    call: Any = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    second = await served.alice.responses.create(
        model="fake",
        input=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me look."},
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "18 degrees"},
            {"role": "user", "content": "Thanks."},
        ],
        previous_response_id=first.id,
        tools=[WEATHER],
    )

    page = await served.alice.responses.input_items.list(second.id)
    kinds = [(i.type, getattr(i, "role", None)) for i in page.data]
    assert kinds == [  # newest first, as OpenAI lists them by default
        ("message", "user"),
        ("function_call_output", None),
        ("function_call", None),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert page.has_more is False
    assert [_text(i) for i in page.data if i.type == "message"] == [
        "Thanks.",
        "Let me look.",
        "Weather?",
    ]
    assert page.data[2].model_dump(include={"call_id", "name", "arguments"}) == {
        "call_id": "c1",
        "name": "get_weather",
        "arguments": "{}",
    }
    assert page.data[1].model_dump()["output"] == "18 degrees"
    ids = [i.id for i in page.data]
    assert len(set(ids)) == len(ids) and all(ids)

    raw = await served.alice.responses.input_items.with_raw_response.list(
        second.id, order="asc", limit=2
    )
    listed = raw.http_response.json()
    assert listed["object"] == "list" and listed["has_more"] is True
    assert [i["id"] for i in listed["data"]] == ids[::-1][:2]
    assert (listed["first_id"], listed["last_id"]) == (ids[-1], ids[-2])
    rest = await served.alice.responses.input_items.list(
        second.id, order="asc", after=listed["last_id"]
    )
    assert [i.id for i in rest.data] == ids[::-1][2:]
    # The SDK's pagination follows last_id to the end.
    walked = [i.id async for i in served.alice.responses.input_items.list(second.id, limit=2)]
    assert walked == ids
    first_items = await served.alice.responses.input_items.list(first.id)
    assert [_text(i) for i in first_items.data] == ["First turn."]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"after": "msg_0"}, "after"),
    ],
)
async def test_bad_input_item_queries_are_400s(
    served: Served, query: dict[str, Any], param: str
) -> None:
    r = await served.alice.responses.create(model="fake", input="Hello.")
    with pytest.raises(openai.BadRequestError) as refused:
        await served.alice.responses.input_items.list(r.id, extra_query=query)
    error = _error(refused.value)
    assert error["type"] == "invalid_request_error" and param in (error["param"] or ""), error


async def test_another_clients_input_items_are_not_found(served: Served) -> None:
    r = await served.alice.responses.create(model="fake", input="Hello.")
    with pytest.raises(openai.NotFoundError):
        await served.bob.responses.input_items.list(r.id)


async def _stopped_mid_answer(url: str) -> str:
    """What a stream leaves when its process is killed: the turn and response written,
    the reply checkpointed while ``partial``, the body NULL, the replica's lease kept
    no more (no clean ``leave``). Returns the response id."""
    killed = Store.from_url(url)
    await killed.start()
    try:
        reply = await killed.add_response_turn(
            "resp_killed",
            [("user", "Tell me a long story.", [], None)],
            owner="alice",
            previous=None,
            conversation_id="c-killed",
            title="Tell me a long story.",
            model="fake",
        )
        await killed.update_message(reply.id, content="Once upon a")
    finally:
        await killed.close()  # the connection only: its lease is left to lapse
    return "resp_killed"


async def test_a_response_left_in_progress_by_a_killed_server_is_failed(
    store_url: str,
) -> None:
    response_id = await _stopped_mid_answer(store_url)
    config = AppConfig(models=[fake_model("fake")], auth={"enabled": False})
    engine = LocalEngineClient(FakeEngine(fake_model("fake")))

    # While the replica writing it may still live (lease not lapsed): in progress.
    alive = Store.from_url(store_url)
    app = create_app(config, {"fake": engine}, metrics=Metrics(), store=alive)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        found = (await http.get(f"/v1/responses/{response_id}")).json()
    assert found["status"] == "in_progress"

    # Restarted once that lease lapsed: recovery at start-up settles it.
    await asyncio.sleep(0.5)
    restarted = Store.from_url(store_url, heartbeat_s=0.1, lease_s=0.3)
    app = create_app(config, {"fake": engine}, metrics=Metrics(), store=restarted)
    async with serving(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        try:
            failed = await client.responses.retrieve(response_id)
            again = await client.responses.retrieve(response_id)
        finally:
            await client.close()
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert failed.error.message == STOPPED
    assert failed.output_text == "Once upon a"  # what was written before it stopped
    assert again.model_dump() == failed.model_dump()
    stored = await _stored_body(store_url, response_id)
    assert stored is not None and stored["status"] == "failed"  # settled, not recomputed


async def _stored_body(url: str, response_id: str) -> dict[str, Any] | None:
    store = Store.from_url(url)
    await store.start()
    try:
        found = await store.get_response(response_id)
        assert found is not None
        return found.body
    finally:
        await store.close()
