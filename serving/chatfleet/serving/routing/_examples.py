"""The built-in example prompts of the default categories (``examples/default.yaml``).

They are package data, read with importlib.resources so they come along in the
wheel; a category of the default set that lists no examples of its own uses them.
"""

from __future__ import annotations

from importlib import resources

import yaml

__all__ = ["builtin_examples"]

_PACKAGE = "chatfleet.serving.routing"
_RESOURCE = ("examples", "default.yaml")


def builtin_examples() -> dict[str, list[str]]:
    """Category name -> its built-in examples (read afresh: callers keep the result)."""
    text = resources.files(_PACKAGE).joinpath(*_RESOURCE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not all(
        isinstance(examples, list) and all(isinstance(e, str) for e in examples)
        for examples in data.values()
    ):
        raise ValueError(f"{'/'.join(_RESOURCE)} must map category names to lists of strings")
    return {str(name): list(examples) for name, examples in data.items()}
