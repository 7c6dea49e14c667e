"""``GET /api/usage``: what each client used, read from the store (`UsageMeter` writes it)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import FastAPI, Query

from chatfleet.serving.api._answers import require_store
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._tenancy import CallerDep


def add_usage_routes(app: FastAPI, gw: Gateway) -> None:
    """``GET /api/usage``: the caller's usage (an admin's: everyone's, filterable)."""

    @app.get(
        "/api/usage",
        tags=["usage"],
        summary="Tokens and requests per client, model and UTC day, newest day first.",
        description="A client sees its own usage; an admin sees every client's, and may"
        " filter by client_id. `totals` adds up the rows returned.",
    )
    async def usage(
        caller: CallerDep,
        client_id: Annotated[
            str | None, Query(max_length=200, description="Only this client (admins).")
        ] = None,
        model: Annotated[str | None, Query(max_length=100, description="Only this model.")] = None,
        since: Annotated[date | None, Query(description="First day (UTC), inclusive.")] = None,
        until: Annotated[date | None, Query(description="Last day (UTC), inclusive.")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000, description="Rows at most.")] = 1000,
    ) -> dict[str, Any]:
        store = require_store(gw.store)
        owner = caller.sees if client_id is None else client_id
        if not caller.admin and owner != caller.client_id:
            rows = []  # another client's usage is not the caller's to see, nor to probe
        else:
            rows = await store.usage(
                owner=owner, model=model, since=since, until=until, limit=limit
            )
        data = [row.to_dict() for row in rows]
        totals = {
            key: sum(row[key] for row in data)
            for key in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
        }
        return {"object": "list", "data": data, "totals": totals}
