"""The routing deployments: the classifier and the compressor (batched, on their own
replicas). The `Router` that calls them runs in each ingress replica."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve

from chatfleet.serving import telemetry
from chatfleet.serving.app._replica import _GRACEFUL_SHUTDOWN_S
from chatfleet.serving.config import (
    ClassifierConfig,
    CompressorConfig,
    TelemetryConfig,
)
from chatfleet.serving.errors import NotConfigured
from chatfleet.serving.protocol import Classification, Compression, Embeddings
from chatfleet.serving.routing.classifier import EmbeddingClassifier


@dataclass(frozen=True, slots=True)
class _ClassifyJob:
    prompt: str
    labels: tuple[str, ...] | None
    descriptions: tuple[tuple[str, str], ...] | None
    multi_label: bool

    @property
    def key(self) -> tuple[object, ...]:
        return (self.labels, self.descriptions, self.multi_label)


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class ClassifierDeployment:
    """The zero-shot classifier; concurrent requests are batched (``@serve.batch``)."""

    def __init__(self, config: ClassifierConfig, tracing: TelemetryConfig | None = None) -> None:
        from chatfleet.serving.routing.classifier import create_classifier

        logging.basicConfig(level=logging.INFO)
        provider = telemetry.configure_tracing(tracing or TelemetryConfig(), component="classifier")
        self._tracer = telemetry.get_tracer(provider)
        self._classifier = create_classifier(config)
        self._classifier.load()
        batched: Any = self._batched  # @serve.batch adds these setters
        batched.set_max_batch_size(config.max_batch_size)
        batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[_ClassifyJob]) -> list[Classification | Exception]:
        # Jobs with the same labels share one forward pass; a group's failure (bad
        # labels) goes back to that group's callers only, not the whole batch.
        results: list[Classification | Exception] = [RuntimeError("unclassified")] * len(jobs)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        for indices in groups.values():
            first = jobs[indices[0]]
            try:
                out = await asyncio.to_thread(
                    self._classifier.classify_batch,
                    [jobs[i].prompt for i in indices],
                    list(first.labels) if first.labels else None,
                    dict(first.descriptions) if first.descriptions else None,
                    first.multi_label,
                )
                for i, result in zip(indices, out, strict=True):
                    results[i] = result
            except Exception as exc:
                for i in indices:
                    results[i] = exc
        return results

    async def classify(
        self,
        prompt: str,
        labels: list[str] | None = None,
        descriptions: dict[str, str] | None = None,
        multi_label: bool = False,
        trace_context: dict[str, str] | None = None,
    ) -> Classification:
        with self._tracer.start_as_current_span(
            "classifier.classify",
            context=telemetry.extract(trace_context),
            kind=SpanKind.SERVER,
        ):
            self._classifier.validate([prompt], labels, descriptions)  # before it joins a batch
            job = _ClassifyJob(
                prompt,
                tuple(labels) if labels else None,
                tuple(sorted(descriptions.items())) if descriptions else None,
                multi_label,
            )
            result = await self._batched(job)
            if isinstance(result, Exception):
                raise result
            return result

    async def embed(
        self, texts: list[str], trace_context: dict[str, str] | None = None
    ) -> Embeddings:
        """``/v1/embeddings``: the sentence encoder the classifier already holds in memory."""
        if not isinstance(self._classifier, EmbeddingClassifier):
            raise NotConfigured("this classifier (backend nli) serves no embeddings")
        with self._tracer.start_as_current_span(
            "classifier.embed", context=telemetry.extract(trace_context), kind=SpanKind.SERVER
        ):
            return await asyncio.to_thread(self._classifier.embed, texts)


@serve.deployment(graceful_shutdown_timeout_s=_GRACEFUL_SHUTDOWN_S)
class CompressorDeployment:
    """LLMLingua prompt compression (CPU- or GPU-bound; one call at a time per thread)."""

    def __init__(self, config: CompressorConfig, tracing: TelemetryConfig | None = None) -> None:
        from chatfleet.serving.routing.compressor import Compressor

        logging.basicConfig(level=logging.INFO)
        provider = telemetry.configure_tracing(tracing or TelemetryConfig(), component="compressor")
        self._tracer = telemetry.get_tracer(provider)
        self._compressor = Compressor(config)
        self._compressor.load()

    async def compress(
        self,
        context: str,
        question: str = "",
        ratio: float | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Compression:
        with self._tracer.start_as_current_span(
            "compressor.compress",
            context=telemetry.extract(trace_context),
            kind=SpanKind.SERVER,
        ):
            return await asyncio.to_thread(self._compressor.compress, context, question, ratio)
