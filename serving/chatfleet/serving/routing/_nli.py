"""The NLI classifier: transformers' zero-shot pipeline, which knows labels by their text."""

from __future__ import annotations

import logging
import math
from typing import Any

from chatfleet.serving.config import ClassifierConfig
from chatfleet.serving.protocol import Classification
from chatfleet.serving.routing._classifier import Classifier, Label, ranked
from chatfleet.serving.routing._runtime import missing_dependency, resolve_device

__all__ = ["DEFAULT_NLI_MODEL", "NLIClassifier"]

logger = logging.getLogger(__name__)

DEFAULT_NLI_MODEL = "facebook/bart-large-mnli"


class NLIClassifier(Classifier):
    """transformers' ``zero-shot-classification`` pipeline over an NLI model.

    ``config.model`` is a hub id or folder of a sequence-classification model
    whose ``id2label`` names an ``entailment`` class (and ``contradiction`` for
    multi-label); empty means ``facebook/bart-large-mnli`` from the hub. Examples
    are not used: an NLI model compares the prompt with each label's text.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        if "{}" not in config.hypothesis_template:
            raise ValueError(
                "classifier.hypothesis_template must contain {} (where the label goes),"
                f" got {config.hypothesis_template!r}"
            )
        self._pipeline: Any = None

    def model_path(self) -> str:
        return self.config.model or DEFAULT_NLI_MODEL

    def _load(self) -> None:
        try:
            from transformers import pipeline
        except ImportError as exc:
            raise missing_dependency("the NLI classifier", "transformers", exc) from exc
        path = self.model_path()
        device = resolve_device(self.config.device)
        logger.info("loading the NLI classifier %s on %s", path, device)
        self._pipeline = pipeline("zero-shot-classification", model=path, device=device)

    def _score(
        self, prompts: list[str], labels: list[Label], multi_label: bool
    ) -> list[Classification]:
        texts = [label.text for label in labels]
        outputs = self._pipeline(
            prompts,
            candidate_labels=texts,
            hypothesis_template=self.config.hypothesis_template,
            multi_label=multi_label,
            # One forward pass covers this many (prompt, hypothesis) pairs.
            batch_size=self.config.max_batch_size,
        )
        if isinstance(outputs, dict):  # the pipeline unwraps a single input
            outputs = [outputs]
        out = []
        for output in outputs:
            by_text = dict(zip(output["labels"], output["scores"], strict=True))
            out.append(ranked(labels, [_finite(by_text[t]) for t in texts], multi_label))
        return out


def _finite(score: float) -> float:
    return float(score) if math.isfinite(score) else 0.0
