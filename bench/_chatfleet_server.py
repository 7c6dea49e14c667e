"""Run the chatfleet app on a private Ray instance until stdin closes (bench helper).

Usage: ``python bench/_chatfleet_server.py CONFIG_JSON PORT``. Starts Ray the way
``chatfleet serve`` does: its open-files limit (raised for the config's sockets), its
``serve_environment`` (Serve's throughput mode; HAProxy in front unless
RAY_SERVE_ENABLE_HA_PROXY=0; variables already set win), ``ray.init``,
``serve.start(http_options)``, ``serve.run(build_app(config), route_prefix="/")``.
Prints ``READY`` on stdout, and shuts Ray down when its stdin reaches EOF (the bench
closes it) or on SIGTERM. ``CHATFLEET_BENCH_SERVE_LOGGING`` (JSON) is passed as Serve's
``logging_config`` to ``serve.start`` and ``serve.run``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time


def main() -> int:
    config_json, port = sys.argv[1], int(sys.argv[2])
    from chatfleet.serving.config import AppConfig

    config = AppConfig.model_validate(json.loads(config_json))
    try:
        from chatfleet.serving._file_limit import files_needed, raise_file_limit
    except ImportError:  # --rev of a chatfleet before it raised its file limit
        pass
    else:
        limit = raise_file_limit(files_needed(config))
        print(f"file limit {limit.soft}/{limit.hard}", file=sys.stderr, flush=True)
    try:
        from chatfleet.serving.cli import serve_environment
    except ImportError:  # --rev of a chatfleet before HAProxy
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    else:
        os.environ.update(serve_environment(os.environ)[0])

    import ray
    from ray import serve

    from chatfleet.serving.app import APP_NAME, build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    try:
        # Optional Serve LoggingConfig (a bench knob; cli.py passes none).
        logging_config = json.loads(os.environ.get("CHATFLEET_BENCH_SERVE_LOGGING", "null"))
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        serve.run(
            build_app(config),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
            logging_config=logging_config,
        )
        print(f"READY {time.perf_counter() - started:.1f}", flush=True)

        def wait_stdin() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=wait_stdin, daemon=True).start()
        while not stop.wait(0.5):
            pass
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
