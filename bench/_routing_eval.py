"""The routing evaluation set and its figures (used by bench/routing.py --only accuracy).

``bench/data/routing_eval.jsonl``: one prompt a line, ``{"prompt", "category",
"tags"}``, written for this evaluation (never copied from the built-in examples
the classifier learns from). Tags: ``short`` (a few words), ``multilingual`` (not
English), ``mixed`` (touches a second category: the label is what the user
wants done), ``long``, ``code`` (code pasted inline). Lines alternate between a
``dev`` half (even line numbers, counted from 0: looked at while the examples and
the method were chosen) and a ``test`` half (odd: only ever scored).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

EVAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "routing_eval.jsonl")

#: Confidence buckets of the calibration table (lower bounds).
BUCKETS = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: str
    category: str
    tags: tuple[str, ...]
    split: str  # dev or test


def load_eval(path: str = EVAL_PATH) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(line for line in f if line.strip()):
            row = json.loads(line)
            split = "dev" if i % 2 == 0 else "test"
            samples.append(Sample(row["prompt"], row["category"], tuple(row["tags"]), split))
    return samples


@dataclass
class Outcome:
    """Predictions of one run over the evaluation set."""

    samples: list[Sample]
    predicted: list[str]
    confidence: list[float]
    categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.categories:
            self.categories = sorted({s.category for s in self.samples})

    def _right(self, i: int) -> bool:
        return self.predicted[i] == self.samples[i].category

    def accuracy(self, where: Sequence[int] | None = None) -> float:
        indices = range(len(self.samples)) if where is None else where
        return sum(self._right(i) for i in indices) / max(1, len(indices))

    def where(self, *, tag: str | None = None, split: str | None = None) -> list[int]:
        return [
            i
            for i, s in enumerate(self.samples)
            if (tag is None or tag in s.tags) and (split is None or s.split == split)
        ]

    def above(self, threshold: float) -> tuple[float, float, float]:
        """(share answered, share wrong and answered, accuracy of the answered)."""
        answered = [i for i, c in enumerate(self.confidence) if c >= threshold]
        wrong = sum(not self._right(i) for i in answered)
        n = len(self.samples)
        return len(answered) / n, wrong / n, self.accuracy(answered) if answered else 1.0

    def print_summary(self, title: str, threshold: float) -> None:
        n = len(self.samples)
        parts = [f"{s} {self.accuracy(self.where(split=s)):.3f}" for s in ("dev", "test")]
        tags = sorted({t for s in self.samples for t in s.tags})
        parts += [f"{t} {self.accuracy(self.where(tag=t)):.2f}" for t in tags]
        answered, wrong, precision = self.above(threshold)
        print(f"{title}: top-1 {self.accuracy():.3f} of {n}  ({', '.join(parts)})")
        print(
            f"  threshold {threshold:.2f}: routed {answered:.1%}, wrong and routed {wrong:.1%}"
            f" of all prompts, right when routed {precision:.1%}"
        )

    def print_confusion(self) -> None:
        cats = self.categories
        width = max(len(c) for c in cats) + 1
        counts = Counter((s.category, p) for s, p in zip(self.samples, self.predicted, strict=True))
        corner = "true / predicted"
        print(f"  {corner:>{width + 2}} " + " ".join(f"{c[:8]:>8}" for c in cats))
        for truth in cats:
            row = " ".join(f"{counts[(truth, p)]:>8}" for p in cats)
            print(f"  {truth:>{width + 2}} {row}")

    def print_calibration(self, thresholds: Sequence[float] = (0.4, 0.5, 0.6, 0.7, 0.8)) -> None:
        print("  calibration: confidence bucket -> prompts, accuracy")
        bounds = [*BUCKETS, 1.0 + 1e-9]
        for lo, hi in itertools.pairwise(bounds):
            where = [i for i, c in enumerate(self.confidence) if lo <= c < hi]
            acc = f"{self.accuracy(where):.2f}" if where else "  - "
            print(
                f"    [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}: {len(where):>4}  {acc}"
            )
        print("  threshold sweep: routed, wrong and routed (of all prompts), right when routed")
        for t in thresholds:
            answered, wrong, precision = self.above(t)
            print(f"    {t:.2f}: {answered:6.1%} {wrong:6.1%} {precision:6.1%}")

    def print_misses(self, limit: int) -> None:
        misses = [i for i in range(len(self.samples)) if not self._right(i)]
        for i in misses[:limit]:
            s = self.samples[i]
            print(
                f"    {s.category:>13} -> {self.predicted[i]:<13} {self.confidence[i]:.2f}"
                f"  {s.prompt[:70]}"
            )
        if len(misses) > limit:
            print(f"    ... {len(misses) - limit} more")
