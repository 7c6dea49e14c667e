"""``GET /v1/models`` and ``GET /v1/models/{model}``: the served models, as OpenAI lists
them, each with what it supports (``capabilities``), the embeddings model and ``auto``
included."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Path

from chatfleet.serving.api._capabilities import model_capabilities
from chatfleet.serving.api._embeddings import embeddings_model_entry
from chatfleet.serving.api._gateway import AUTO_MODEL, Gateway
from chatfleet.serving.errors import ModelNotFound

__all__ = ["add_model_routes"]


def add_model_routes(app: FastAPI, gw: Gateway) -> None:
    def served() -> list[dict[str, Any]]:
        config = gw.config
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": gw.created,
                "owned_by": "chatfleet",
                "engine": m.engine,
                "description": m.description,
                "capabilities": model_capabilities([m]),
            }
            for m in config.models
        ]
        if gw.embeddings is not None and config.classifier is not None:
            data.append(embeddings_model_entry(config.classifier.embeddings_model, gw.created))
        if gw.router is not None:
            data.append(
                {
                    "id": AUTO_MODEL,
                    "object": "model",
                    "created": gw.created,
                    "owned_by": "chatfleet",
                    "engine": "router",
                    "description": "Chooses a model from the prompt's category.",
                    # The routed model is checked again: only what all of them do.
                    "capabilities": model_capabilities(config.models),
                }
            )
        return data

    @app.get("/v1/models", tags=["openai"], summary="The served models.")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": served()}

    @app.get("/v1/models/{model}", tags=["openai"], summary="One served model.")
    async def retrieve_model(
        model: str = Path(max_length=200, description="A served model's id."),
    ) -> dict[str, Any]:
        # OpenAI's SDKs call this (`client.models.retrieve`) to check a model exists.
        entry = next((m for m in served() if m["id"] == model), None)
        if entry is None:
            raise ModelNotFound(f"The model {model!r} does not exist", param="model")
        return entry
