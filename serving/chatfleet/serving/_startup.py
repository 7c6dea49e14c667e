"""Starting the application locally: stage lines, the first token, deploying and waiting.

Deploying:

Left to itself, Ray Serve retries a replica whose constructor raises (three
times a replica; minutes for a model that loads slowly) and then says only
"Failed to update the deployments [...]", with the exception in a controller log
file. The exception is also in the deployment's status message
(`ray.serve.status`) from the first failure on: `deploy` polls that status,
reports what is still loading, and raises `StartupError` carrying the replica's
own exception as soon as one fails.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from chatfleet.serving._preflight import StartupError
from chatfleet.serving.config import AppConfig

__all__ = [
    "deploy",
    "describe_parts",
    "local_access",
    "prepare_models",
    "quiet_libraries",
    "ready_lines",
    "replica_error",
    "say",
]

_ERROR_MARKER = "Error:\n"
_MODULE_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=\w+: )")


def deploy(
    app: Any,
    *,
    name: str,
    logging_config: dict[str, Any],
    progress: Callable[[str], None],
    stopped: Callable[[], bool],
    debug: bool = False,
    poll_s: float = 0.5,
    progress_every_s: float = 10.0,
) -> bool:
    """Deploy ``app`` and wait until it runs (True) or ``stopped()`` (False).

    Raises `StartupError` with the failing deployment's exception (its whole
    traceback when ``debug``).
    """
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    serve.run_many(
        [serve.RunTarget(target=app, name=name, route_prefix="/", logging_config=logging_config)],
        wait_for_applications_running=False,
    )
    started = last_report = time.monotonic()
    while not stopped():
        application = serve.status().applications.get(name)
        if application is not None:
            if application.status == ApplicationStatus.RUNNING:
                return True
            failure = _failure(application, debug)
            if failure is not None:
                raise failure
            now = time.monotonic()
            if now - last_report >= progress_every_s:
                last_report = now
                waiting = sorted(
                    d for d, s in application.deployments.items() if s.status != "HEALTHY"
                )
                progress(f"still loading {', '.join(waiting)} ({now - started:.0f} s)")
        time.sleep(poll_s)
    return False


def _failure(application: Any, debug: bool) -> StartupError | None:
    for deployment, status in sorted(application.deployments.items()):
        failed = status.status in ("DEPLOY_FAILED", "UNHEALTHY")
        if failed or "failed to start" in status.message:
            return StartupError(
                f"{_describe(deployment)} failed to start: {replica_error(status.message, debug)}",
                "" if debug else "check its settings in --config; --debug shows the traceback",
            )
    if application.status == "DEPLOY_FAILED":
        return StartupError(
            f"the application failed to deploy: {replica_error(application.message, debug)}"
        )
    return None


def _describe(deployment: str) -> str:
    if deployment.startswith("engine-"):
        return f"model {deployment.removeprefix('engine-')!r}"
    return f"the {deployment}"


def replica_error(message: str, debug: bool = False) -> str:
    """The exception a Serve status message carries: its last line, or all with ``debug``.

    Serve's message is a sentence, ``Error:`` and the replica's traceback, which
    ends with the exception (``OSError: ... does not exist``).
    """
    detail = message.split(_ERROR_MARKER, 1)[1] if _ERROR_MARKER in message else message
    if debug:
        return detail.strip()
    lines = [line for line in detail.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line[0].isspace()), "")
    exception = (last or (lines[-1] if lines else message)).strip()
    # "chatfleet.serving.errors.EngineUnavailable: ..." reads as "EngineUnavailable: ...".
    return _MODULE_PREFIX.sub("", exception, count=1)[:500]


def local_access(config: AppConfig, url: str) -> tuple[AppConfig, str, str | None]:
    """Register a ``local`` client when none is configured; mint its first token.

    Returns the config to deploy, lines telling how to authenticate, and the
    token to use (None when auth is off or clients are configured). The token is
    signed with the local key (data folder), which the ingress reads too.
    """
    if not config.auth.enabled:
        return config, "  auth is off (--no-auth): anyone who reaches the port may use it.", None
    if config.auth.clients:
        ids = ", ".join(c.client_id for c in config.auth.clients)
        return (
            config,
            f"  auth is on; clients: {ids}. Get a token:\n"
            f"    curl -s {url}/auth/token -d client_id=<id> -d client_secret=<secret>",
            None,
        )
    import hashlib
    import secrets

    from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
    from chatfleet.serving.config import ClientCredential

    secret = secrets.token_urlsafe(32)
    local = ClientCredential(
        client_id="local", secret_sha256=hashlib.sha256(secret.encode()).hexdigest()
    )
    config = config.model_copy(update={"auth": config.auth.model_copy(update={"clients": [local]})})
    auth = Authenticator.from_config(
        config.auth, MemoryRevocationStore(), data_dir=config.store.data_dir
    )
    token = auth.mint(local.client_id, local.scopes).access_token
    minutes = config.auth.access_token_ttl_s // 60
    lines = (
        f"  token (expires in {minutes} min): {token}\n"
        f"  a new one: curl -s {url}/auth/token -d client_id=local -d client_secret={secret}"
    )
    return config, lines, token


def prepare_models(config: AppConfig) -> None:
    """Do slow one-time work (model conversion) here, where progress is visible."""
    embedded_engine = any(
        m.engine == "transformers" and m.transformers and not m.transformers.model
        for m in config.models
    )
    compressor = config.compressor
    embedded_compressor = (
        compressor is not None and compressor.method == "llmlingua" and not compressor.model
    )
    if not (embedded_engine or embedded_compressor):
        return
    from chatfleet.serving.embedded import embedded_model_ready, ensure_embedded_model

    if embedded_model_ready():
        return
    # In a child process: the conversion leaves torch and ~1 GB behind in the
    # process that ran it, and this one stays up as long as the server does.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(ensure_embedded_model, None, say).result()


def say(line: str) -> None:
    """One stage of the start-up, on stdout (the token is there too)."""
    print(f"chatfleet: {line}", flush=True)


def describe_parts(config: AppConfig) -> str:
    """What `deploy` loads, for the stage line: the models, then the routing parts."""
    parts = [f"{m.name} ({m.engine})" for m in config.models]
    if config.classifier is not None:
        parts.append("the classifier")
    if config.compressor is not None:
        parts.append(f"the compressor ({config.compressor.method})")
    if config.routing is not None:
        parts.append("the router")
    return ", ".join(parts)


def ready_lines(
    config: AppConfig, url: str, access: str, token: str | None, metrics_port: int | None
) -> str:
    bearer = f" -H 'Authorization: Bearer {token}'" if token else ""
    model = "auto" if config.routing is not None else config.default_model_name
    metrics = ""
    if metrics_port:
        metrics = f"  metrics: http://127.0.0.1:{metrics_port}/metrics (all replicas)\n"
    return (
        f"serving on {url}  (OpenAI API at {url}/v1, docs at {url}/docs)\n"
        f"{access}\n"
        f"  dashboard: {url}/{f'#token={token}' if token else ''}\n"
        f"{metrics}"
        f"  try: curl -N {url}/v1/chat/completions{bearer}"
        " -H 'Content-Type: application/json'"
        f' -d \'{{"model": "{model}", "stream": true,'
        f' "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        "  Ctrl-C to stop."
    )


def quiet_libraries(debug: bool) -> None:
    """Keep third-party advice off a person's console (``--debug`` shows it all).

    Set in the environment because the Ray workers started from this process read
    it too: transformers' legacy-tokenizer paragraph (the GGUF tokenizer) and
    similar advisories concern chatfleet's code, not the person running it.
    """
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Ray warns that token auth is on whenever ~/.ray/auth_token exists; a private
    # local instance needs no advice on it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
