"""A private local Ray with Serve started as `chatfleet serve` starts it, for tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakes.ports import free_port


@contextlib.contextmanager
def private_ray_serve(data_dir: Path, **init: Any) -> Iterator[int]:
    """Start Ray and Serve on a free HTTP port, yield the port, shut both down.

    ``init`` adds to ``ray.init``'s arguments (e.g. ``object_store_memory``).
    """
    import ray
    from ray import serve

    from chatfleet.serving.cli import serve_environment

    # The Serve settings `chatfleet serve` runs with (throughput mode, replicas at
    # normal priority, HAProxy in front of the ingress), for Ray's daemons and workers
    # only: they inherit this process's environment at ray.init, and later
    # `chatfleet serve` subprocesses must not.
    env, _ = serve_environment(os.environ)
    # In direct-ingress mode Serve keeps a deleted or stopping ingress replica 30 s for
    # load balancers to notice. Nothing here needs that.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    saved = dict(os.environ)
    os.environ.update(env)
    ray.init(
        # Logical CPUs: replicas ask for fractions, and an app plus the Serve
        # controller and proxy must fit whatever the physical count.
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # Replicas keep their SQLite store and JWT key here, not in ~.
                "CHATFLEET_DATA_DIR": str(data_dir),
            }
        },
        **init,
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
