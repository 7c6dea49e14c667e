"""Stored responses: ``GET /v1/responses/{id}``, its ``input_items`` and ``DELETE``.

Only the caller's own responses are found; another client's id is a 404, as an unknown
one. A response whose answer stopped with its process (its reply left ``partial`` and
then marked ``interrupted`` by recovery, `api._recovery`) is answered ``failed``, with
what had been written as its output: ``failed`` rather than ``incomplete``, whose
reasons in OpenAI's API (``max_output_tokens``, ``content_filter``) say the model
stopped and a client may go on, where here the server did and the answer is cut. That
body is stored as it is first read, so the response is settled from then on.

A deleted response is gone with its own turn, but responses built on it keep their
whole context (`store._responses`), as OpenAI keeps them usable.

Input items are listed as OpenAI lists them (newest first by default); their ids name
the stored message they come from (``msg_<n>``, ``fc_<n>_<i>``, ``fco_<n>``), so an
``after`` cursor stays valid however the list is ordered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query

from chatfleet.serving.api._answers import BackgroundWrites, best_effort, require_store
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.errors import NotFound, RequestError
from chatfleet.serving.store import StoredMessage, StoredResponse

__all__ = ["add_stored_response_routes", "input_items", "stopped_body"]

#: What a response whose server stopped mid-answer says (``error.message``).
STOPPED = "the server stopped before this response was finished; its output is what was written"

_STATUS_OF_REPLY = {"complete": "completed", "cancelled": "cancelled"}


def stopped_body(found: StoredResponse, reply: StoredMessage | None) -> dict[str, Any]:
    """The Response object of a response whose answer ended without its body stored."""
    status = _STATUS_OF_REPLY.get(reply.status if reply is not None else "", "failed")
    output: list[dict[str, Any]] = []
    if reply is not None and reply.content:
        part = {"type": "output_text", "text": reply.content, "annotations": [], "logprobs": []}
        output.append(
            {
                "type": "message",
                "id": f"msg_{found.id.removeprefix('resp_')}",
                "status": "completed" if status == "completed" else "incomplete",
                "role": "assistant",
                "content": [part],
            }
        )
    return {
        "id": found.id,
        "object": "response",
        "created_at": int(found.created_at.timestamp()),
        "status": status,
        "error": {"code": "server_error", "message": STOPPED} if status == "failed" else None,
        "incomplete_details": None,
        "instructions": None,
        "model": reply.model if reply is not None and reply.model else "",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": True,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": {},
        "usage": None,
    }


def input_items(messages: list[StoredMessage]) -> list[dict[str, Any]]:
    """A response's input messages as Responses input items, oldest first."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "id": f"fco_{m.id}",
                    "call_id": m.tool_call_id or "",
                    "output": m.content,
                    "status": "completed",
                }
            )
            continue
        if m.content or not m.tool_calls:
            kind = "output_text" if m.role == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": m.content}
            if kind == "output_text":
                part["annotations"] = []
            items.append(
                {
                    "type": "message",
                    "id": f"msg_{m.id}",
                    "role": m.role,
                    "status": "completed",
                    "content": [part],
                }
            )
        for i, call in enumerate(m.tool_calls or ()):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{m.id}_{i}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
    return items


def add_stored_response_routes(app: FastAPI, gw: Gateway, writes: BackgroundWrites) -> None:
    """Reading and deleting stored responses; bodies settled on read finish through
    ``writes`` (drained on shutdown)."""

    async def owned(response_id: str, owner: str | None) -> StoredResponse:
        found = await require_store(gw.store).get_response(response_id, owner=owner)
        if found is None:
            raise NotFound(f"response {response_id!r} not found", param="response_id")
        return found

    @app.get(
        "/v1/responses/{response_id}",
        tags=["openai"],
        summary="A stored response (the caller's own).",
        description="`failed` (error `server_error`) if its server stopped while answering.",
    )
    async def get_response(response_id: str, caller: CallerDep) -> dict[str, Any]:
        found = await owned(response_id, caller.sees)
        if found.body is not None:
            return found.body
        store = require_store(gw.store)
        reply = await store.response_reply(found)
        if reply is not None and reply.status == "partial":  # still being answered
            return {"id": found.id, "object": "response", "status": "in_progress", "output": []}
        body = stopped_body(found, reply)
        await best_effort(
            lambda: writes.settle(store.finish_response(found.id, body)),
            "store of a stopped response",
        )
        return body

    @app.get(
        "/v1/responses/{response_id}/input_items",
        tags=["openai"],
        summary="The input items of a stored response (the caller's own), a page at a time.",
        description=(
            "OpenAI's list: `data`, `first_id`, `last_id`, `has_more`. Items are the"
            " messages, function calls and function outputs of that response's own input"
            " (not of the responses it was built on; reasoning items are not kept)."
        ),
    )
    async def list_input_items(
        response_id: str,
        caller: CallerDep,
        limit: Annotated[int, Query(ge=1, le=100, description="How many items (1-100).")] = 20,
        order: Annotated[
            Literal["asc", "desc"], Query(description="asc: oldest first; desc: newest first.")
        ] = "desc",
        after: Annotated[
            str | None, Query(max_length=200, description="List the items after this item id.")
        ] = None,
    ) -> dict[str, Any]:
        found = await owned(response_id, caller.sees)
        items = input_items(await require_store(gw.store).response_inputs(found))
        if order == "desc":
            items.reverse()
        start = 0
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise RequestError(
                    f"after: {after!r} is not an input item of response {response_id!r}",
                    param="after",
                )
            start = ids.index(after) + 1
        page = items[start : start + limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(items),
        }

    @app.delete(
        "/v1/responses/{response_id}",
        tags=["openai"],
        summary="Delete a stored response (the caller's own).",
        description=(
            "Its id is not found afterwards (GET, `previous_response_id`); responses"
            " already built on it keep their own content and can still be continued."
        ),
    )
    async def delete_response(response_id: str, caller: CallerDep) -> dict[str, Any]:
        store = require_store(gw.store)
        if not await store.delete_response(response_id, owner=caller.sees):
            raise NotFound(f"response {response_id!r} not found", param="response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}
