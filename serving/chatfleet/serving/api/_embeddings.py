"""``POST /v1/embeddings``: OpenAI's embeddings API over the classifier's sentence encoder.

The embedded all-MiniLM-L6-v2 (or whatever ``classifier.model`` names, with
``backend: embedding``) is already loaded by the classifier's replicas for routing;
the same replicas answer here, so retrieval pipelines use one more endpoint of the
same server, with the same auth, at no extra memory. Vectors are unit length (cosine
similarity is their dot product). ``encoding_format: base64`` sends little-endian
float32, as OpenAI does; ``dimensions`` other than the model's own is refused.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import ConfigDict, Field, StrictInt, StrictStr, field_validator

from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._schemas import ClientBody
from chatfleet.serving.config import EngineCapabilities
from chatfleet.serving.errors import ModelNotFound, NotConfigured, RequestError

#: Texts one request may embed (OpenAI allows 2,048).
MAX_INPUTS = 2048
_TEXT = Annotated[StrictStr, Field(min_length=1, max_length=100_000)]


class EmbeddingsRequest(ClientBody):
    """OpenAI's ``CreateEmbeddingRequest``; unknown fields are refused as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="The embeddings model (`classifier.embeddings_model`).")
    input: _TEXT | list[_TEXT] = Field(
        description="A text or a list of texts (token arrays are not accepted)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Only the model's own number of dimensions is accepted."
    )
    user: StrictStr | None = Field(None, max_length=256, description="Accepted, unused.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: Any) -> Any:
        # Said in one sentence naming input, not as each member of the union failing. The
        # ids a client tokenized (tiktoken's, for OpenAI's models) mean nothing to this
        # model's own tokenizer, so they are refused rather than guessed at.
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, int | list) and not isinstance(item, bool) for item in items):
            raise ValueError(
                "token arrays are not accepted: send the texts (LangChain's"
                " OpenAIEmbeddings: check_embedding_ctx_length=False)"
            )
        return value

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise RequestError("input: give at least one text", param="input")
        if len(texts) > MAX_INPUTS:
            raise RequestError(f"input: at most {MAX_INPUTS} texts", param="input")
        return texts


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embeddings_model_entry(name: str, created: int) -> dict[str, Any]:
    """The embeddings model as ``GET /v1/models`` lists it: it embeds, it does not chat."""
    capabilities: dict[str, Any] = {flag: False for flag in EngineCapabilities().as_dict()}
    capabilities.update(chat=False, embeddings=True, sampling_parameters=[])
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "chatfleet",
        "engine": "embedding",
        "description": "Sentence embeddings (POST /v1/embeddings), the classifier's encoder.",
        "capabilities": capabilities,
    }


def add_embeddings_routes(app: FastAPI, gw: Gateway) -> None:
    name = None if gw.config.classifier is None else gw.config.classifier.embeddings_model

    @app.post(
        "/v1/embeddings",
        tags=["openai"],
        summary="Sentence embeddings of one or more texts (the classifier's encoder).",
    )
    async def embeddings(body: EmbeddingsRequest) -> dict[str, Any]:
        if gw.embeddings is None or name is None:
            raise NotConfigured(
                "this server has no embeddings model: configure a classifier with backend embedding"
            )
        if body.model != name:
            raise ModelNotFound(
                f"model {body.model!r} not found; the embeddings model is {name!r}",
                param="model",
            )
        result = await gw.embeddings.embed(body.texts())
        size = len(result.vectors[0]) if result.vectors else 0
        if body.dimensions is not None and body.dimensions != size:
            raise RequestError(
                f"model {name} has {size} dimensions; it cannot return {body.dimensions}",
                param="dimensions",
            )
        return {
            "object": "list",
            "model": name,
            "data": [
                {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
                for i, v in enumerate(result.vectors)
            ],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
