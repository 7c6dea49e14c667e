"""The classifier contract: what a request's labels are, and how they are checked.

A label is a name, a text (``"name: description"``, or the name alone) and the
example prompts it learns from. The configured categories bring their examples
(or the built-in ones, see `_examples`); a name given per request that matches a
configured category brings that category's examples too, unless the request
describes it differently (then it is another category to the client, known by
its text alone); any other name is known by its text alone.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from chatfleet.serving.config import ClassifierConfig
from chatfleet.serving.errors import RequestError
from chatfleet.serving.protocol import Classification
from chatfleet.serving.routing._examples import builtin_examples

#: Request limits (the config's own categories are bounded the same way).
MAX_LABELS = 64
MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 500


@dataclass(frozen=True, slots=True)
class Label:
    """One label of a request, as the backends see it."""

    name: str
    text: str
    examples: tuple[str, ...] = field(default=(), repr=False)


def label_text(name: str, description: str) -> str:
    # The same text as CategoryConfig.label_text, for labels given per request.
    return f"{name}: {description}" if description else name


class Classifier(abc.ABC):
    """Scores prompts against labels; subclasses implement `_load` and `_score`."""

    def __init__(self, config: ClassifierConfig) -> None:
        self.config = config
        self._load_lock = threading.Lock()
        self._loaded = False
        builtins = builtin_examples() if config.builtin_examples else {}
        self._configured = {
            c.name: Label(
                c.name,
                label_text(c.name, c.description.strip()),
                tuple(c.examples) or tuple(builtins.get(c.name, ())),
            )
            for c in config.categories
        }

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def categories(self) -> list[Label]:
        """The configured categories, with the examples each learns from."""
        return list(self._configured.values())

    def load(self) -> None:
        """Load the model (heavy: seconds). Idempotent; `classify_batch` calls it too."""
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def validate(
        self,
        prompts: Sequence[str],
        labels: Sequence[str] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        """Raise `RequestError` for an empty prompt or bad categories; never loads the model."""
        self._check_prompts(prompts)
        self.labels(labels, descriptions)

    def classify_batch(
        self,
        prompts: list[str],
        labels: list[str] | None = None,
        descriptions: dict[str, str] | None = None,
        multi_label: bool = False,
    ) -> list[Classification]:
        """Classify ``prompts`` against the same labels, one `Classification` per prompt.

        ``labels`` None means the config's categories (with their descriptions and
        examples); ``descriptions`` maps a label name to what belongs there (it
        overrides a configured category's description).
        """
        self._check_prompts(prompts)
        resolved = self.labels(labels, descriptions)
        if not prompts:
            return []
        self.load()
        return self._score(list(prompts), resolved, multi_label)

    def classify(
        self,
        prompt: str,
        labels: list[str] | None = None,
        descriptions: dict[str, str] | None = None,
        multi_label: bool = False,
    ) -> Classification:
        """`classify_batch` for one prompt."""
        return self.classify_batch([prompt], labels, descriptions, multi_label)[0]

    @abc.abstractmethod
    def _load(self) -> None:
        """Load the model; called once, under a lock."""

    @abc.abstractmethod
    def _score(
        self, prompts: list[str], labels: list[Label], multi_label: bool
    ) -> list[Classification]:
        """One `Classification` per prompt over ``labels`` (see `ranked`)."""

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> None:
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise RequestError(
                    f"prompt must be a string, not {type(prompt).__name__}", param="prompt"
                )
            if not prompt.strip():
                raise RequestError("prompt must not be empty", param="prompt")

    def labels(
        self, names: Sequence[str] | None, descriptions: Mapping[str, str] | None = None
    ) -> list[Label]:
        """The labels of a request (``names`` None: the configured categories)."""
        described = dict(descriptions or {})
        checked = list(self._configured) if names is None else _check_names(names)
        unknown = sorted(set(described) - set(checked))
        if unknown:
            raise RequestError(
                f"descriptions given for categories that are not offered: {', '.join(unknown)}",
                param="possible_categories",
            )
        for name, description in described.items():
            if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
                raise RequestError(
                    f"the description of {name!r} must be a string of at most"
                    f" {MAX_DESCRIPTION_CHARS} characters",
                    param="possible_categories",
                )
        out = [self._label(name, described.get(name)) for name in checked]
        if len({label.text for label in out}) != len(out):
            raise RequestError(
                "two categories have the same name and description", param="possible_categories"
            )
        return out

    def _label(self, name: str, description: str | None) -> Label:
        configured = self._configured.get(name)
        if configured is None:
            return Label(name, label_text(name, (description or "").strip()))
        if description is None or label_text(name, description.strip()) == configured.text:
            return configured
        return Label(name, label_text(name, description.strip()))


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise RequestError(
            "possible_categories must be a list of category names", param="possible_categories"
        )
    checked = [_check_name(name) for name in names]
    if not checked:
        raise RequestError(
            "possible_categories must name at least one category", param="possible_categories"
        )
    if len(checked) > MAX_LABELS:
        raise RequestError(
            f"at most {MAX_LABELS} categories can be given, not {len(checked)}",
            param="possible_categories",
        )
    duplicates = sorted({n for n in checked if checked.count(n) > 1})
    if duplicates:
        raise RequestError(
            f"duplicate categories: {', '.join(repr(d) for d in duplicates)}",
            param="possible_categories",
        )
    return checked


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RequestError("category names must be non-empty strings", param="possible_categories")
    if len(name) > MAX_LABEL_CHARS:
        raise RequestError(
            f"category names are at most {MAX_LABEL_CHARS} characters",
            param="possible_categories",
        )
    return name.strip()


def ranked(
    labels: Sequence[Label],
    scores: Sequence[float],
    multi_label: bool,
    nearest: Mapping[str, list[tuple[str, float]]] | None = None,
) -> Classification:
    """A `Classification`, best label first (ties keep the request's order)."""
    order = sorted(range(len(labels)), key=lambda i: -scores[i])
    return Classification(
        labels=[labels[i].name for i in order],
        scores=[float(scores[i]) for i in order],
        multi_label=multi_label,
        nearest=dict(nearest or {}),
    )
