"""Small helpers shared by the classifier and the compressor (no heavy imports here)."""

from __future__ import annotations

from typing import Literal

from chatfleet.serving.errors import EngineUnavailable

__all__ = ["INSTALL_HINT", "missing_dependency", "resolve_device"]

INSTALL_HINT = "pip install 'chatfleet[serving]'"


def missing_dependency(what: str, package: str, exc: ImportError) -> EngineUnavailable:
    """The error for an optional dependency that is not installed, naming the extra."""
    return EngineUnavailable(
        f"{what} needs the Python package {package} ({exc.name or exc}): {INSTALL_HINT}"
    )


def resolve_device(device: Literal["cpu", "cuda", "auto"]) -> str:
    """``auto`` means CUDA when torch sees a GPU, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
