"""``chatfleet`` command line: run the serving application locally."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from chatfleet.serving._drain_request import DrainRequest
from chatfleet.serving._file_limit import capacity_warning, files_needed, raise_file_limit
from chatfleet.serving._preflight import StartupError, check_models, check_port, yaml_error
from chatfleet.serving._serve_env import serve_environment
from chatfleet.serving._shutdown import (
    Stop,
    drain_local_replicas,
    run_processes,
    shutdown_serve,
    stop_leftovers,
)
from chatfleet.serving._startup import (
    deploy,
    describe_parts,
    local_access,
    prepare_models,
    quiet_libraries,
    ready_lines,
    say,
)
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
        "--debug",
        action="store_true",
        help="Show every library's log lines and, on a failure, the whole traceback.",
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
    drain = commands.add_parser(
        "drain",
        help="Drain the ingress replicas on this machine (a Kubernetes preStop hook).",
        description="What chatfleet serve does on SIGTERM: readiness goes 503, new requests"
        " get 503 shutting_down, streams may finish for server.drain_timeout_s, then end with"
        " their terminal event. Returns when every ingress replica here is drained.",
    )
    drain.add_argument("--config", type=Path, help="YAML or JSON AppConfig file.")
    drain.add_argument("--port", type=int, help="The served port (default: the config's).")
    drain.add_argument("--timeout", type=float, help="The served server.drain_timeout_s.")
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
        config = config.with_embedded_pipeline(args.engine)
    elif args.config is None and config.is_bare_default():
        config = config.with_embedded_pipeline("transformers")
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


# The tests (and older callers) reach the first token and the environment through the
# CLI module.
_local_access = local_access


def serve(args: argparse.Namespace) -> int:
    """``chatfleet serve``; a `StartupError` is the caller's to print."""
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        print(f"chatfleet: --metrics-port {args.metrics_port}: not a port", file=sys.stderr)
        return 2
    try:
        config = _serve_config(args)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"chatfleet: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"chatfleet: {yaml_error(args.config, exc)}", file=sys.stderr)
        return 2
    check_port(config.server.host, config.server.port)
    if args.metrics_port:
        check_port("127.0.0.1", args.metrics_port, flag="--metrics-port")
    check_models(config)
    quiet_libraries(args.debug)
    prepare_models(config)
    url = f"http://{config.server.host}:{config.server.port}"
    try:
        config, access, token = local_access(config, url)
    except (ValueError, OSError) as exc:
        print(f"chatfleet: cannot set up authentication: {exc}", file=sys.stderr)
        return 2

    # Before Ray starts: its workers and the HAProxy one of them spawns inherit the
    # limit, and HAProxy's maxconn (serve_environment) is sized from it.
    limit = raise_file_limit(files_needed(config))
    if (capped := capacity_warning(config, limit)) is not None:
        logger.warning("%s", capped)
    # Before Ray is imported: Serve reads these once, at import (handles made here
    # would otherwise default to Ray actor calls instead of the throughput mode's gRPC).
    env, front = serve_environment(os.environ)
    os.environ.update(env)

    import ray
    from ray import serve as ray_serve

    from chatfleet.serving.app import APP_NAME, build_app

    drain_request = DrainRequest(config.server.port)
    drain_request.clear()
    # Nothing local must notice a replica leave, and the drain has emptied it:
    # Serve need not hold it open 30 s more on shutdown.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    stop = Stop()
    stop.install()

    say(f"starting Ray (about 20 s; HTTP through {front})...")
    ray.init(
        # A private local instance, unless RAY_ADDRESS names a cluster to join.
        address=os.environ.get("RAY_ADDRESS") or "local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _metrics_export_port=args.metrics_port,
        configure_logging=True,
        logging_level=logging.DEBUG if args.debug else logging.WARNING,
        # The controller's and replicas' own INFO lines; a replica that fails is
        # reported from Serve's status instead (chatfleet.serving._startup).
        log_to_driver=args.debug,
    )
    stop.install()  # ray.init made SIGTERM a plain exit, skipping the drain
    if not args.debug:
        # Serve's driver-side INFO lines ("Started Serve in namespace ...") repeat
        # what the stage lines below say.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        ray_serve.start(http_options={"host": config.server.host, "port": config.server.port})
        say(f"loading {describe_parts(config)}...")
        running = deploy(
            build_app(config),
            name=APP_NAME,
            # Serve's per-request access log costs ~15% of the CPU per request;
            # chatfleet's own metrics and traces cover what it would say.
            logging_config={"enable_access_log": False},
            progress=say,
            stopped=stop.requested.is_set,
            debug=args.debug,
        )
        if running:
            say(ready_lines(config, url, access, token, args.metrics_port))
            stop.requested.wait()
            server = config.server
            drain_local_replicas(drain_request, server, give_up=stop.hurried.is_set, progress=say)
        say("shutting down...")
        if not stop.hurried.is_set():
            shutdown_serve(timeout_s=15.0)  # replicas' own shutdown: sessions, the store
    finally:
        processes = run_processes()
        ray.shutdown()
        left = stop_leftovers(processes)  # HAProxy outlives the Serve actor that ran it
        if left:
            logger.info("ended %s, left running after Ray stopped", ", ".join(sorted(set(left))))
        drain_request.clear()
    say("stopped.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    if args.command == "serve":
        try:
            return serve(args)
        except StartupError as exc:
            print(f"chatfleet: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:
            if debug:
                raise
            print(
                f"chatfleet: start-up failed: {type(exc).__name__}: {_first_line(exc)}\n"
                "  run again with --debug for the traceback",
                file=sys.stderr,
            )
            return 1
    if args.command == "token":
        logging.getLogger("chatfleet").setLevel(logging.WARNING)  # stdout is the token alone
        return mint_token(args)
    if args.command == "drain":
        server = load_config(args.config).server
        if args.timeout is not None:
            server = server.model_copy(update={"drain_timeout_s": args.timeout})
        return 0 if drain_local_replicas(DrainRequest(args.port or server.port), server) else 1
    if args.command == "db" and args.db_command == "upgrade":
        return db_upgrade(args)
    parser.print_help()
    return 0 if args.command is None else 2


class _ConsoleFormatter(logging.Formatter):
    """chatfleet's own log lines read like its stage lines ("chatfleet: ..."); others'
    keep their level and logger name."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not record.name.startswith("chatfleet") or record.exc_info:
            return super().format(record)
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return f"chatfleet: {message}"


def _configure_logging(debug: bool) -> None:
    # Libraries log their own progress at INFO (alembic's "setup plugin" lines):
    # the console shows chatfleet's lines and everyone's warnings; --debug, all.
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter())
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    logging.getLogger("chatfleet").setLevel(logging.DEBUG if debug else logging.INFO)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
