"""A ChatDeployment's spec as the operator reads it, and the errors it can have."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from chatfleet.operator._models import ChatDeploymentSpec


class InvalidSpecError(Exception):
    """The ChatDeployment's spec can't be reconciled as written."""


class MissingSecretError(InvalidSpecError):
    """The spec references a Secret (or key) that does not exist (yet)."""


def describe_validation_error(exc: ValidationError, root: str = "spec") -> str:
    """One line per problem, each naming the field (``spec.serving.models[0].vllm: ...``)."""
    lines = []
    for err in exc.errors():
        where = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_spec(raw: Mapping[str, Any] | None) -> ChatDeploymentSpec:
    """Validate a ChatDeployment's ``spec``; raises `InvalidSpecError` naming the fields."""
    try:
        return ChatDeploymentSpec.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise InvalidSpecError(describe_validation_error(exc)) from None


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_status(conditions: Iterable[Mapping[str, Any]] | None) -> str:
    """The status of the ``Ready`` condition in ``conditions``; ``Unknown`` without one."""
    for cond in conditions or ():
        if cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown")
    return "Unknown"
