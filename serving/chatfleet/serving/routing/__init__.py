"""Prompt routing: zero-shot classification, LLMLingua compression, model selection."""

from chatfleet.serving.routing.classifier import (
    Classifier,
    EmbeddingClassifier,
    NLIClassifier,
    create_classifier,
)
from chatfleet.serving.routing.compressor import Compressor
from chatfleet.serving.routing.router import PreviousRoute, Router, RoutingDecision

__all__ = [
    "Classifier",
    "Compressor",
    "EmbeddingClassifier",
    "NLIClassifier",
    "PreviousRoute",
    "Router",
    "RoutingDecision",
    "create_classifier",
]
