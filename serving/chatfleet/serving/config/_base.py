"""What every config model shares: a frozen base that rejects unknown fields, and
the pattern of names (models, categories)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Model names become Ray deployment names, metric labels and URL parts.
_MODEL_NAME = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
