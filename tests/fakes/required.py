"""Real parts a test needs: missing one skips it on a laptop and fails it in CI.

CI (``$CI`` set to anything but 0/false/no) runs on a machine where ``scripts/test``
installs every real part (PostgreSQL, Chromium, Prometheus, the control plane), so a
missing one there is a broken install step, never a reason to skip.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "missing"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, *, module: bool = False) -> NoReturn:
    """Skip (locally) or fail (in CI) because ``what`` is not there."""
    if in_ci():
        pytest.fail(f"{what}; CI must have it (scripts/test installs it)", pytrace=False)
    pytest.skip(what, allow_module_level=module)
