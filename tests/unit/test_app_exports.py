"""The public surface of `chatfleet.serving.app`, the Ray Serve wiring."""

from __future__ import annotations

import importlib

import chatfleet.serving.app as app_pkg
from chatfleet.operator._names import IMPORT_PATH


def test_public_surface() -> None:
    assert sorted(app_pkg.__all__) == [
        "APP_NAME",
        "ClassifierDeployment",
        "CompressorDeployment",
        "EngineDeployment",
        "Ingress",
        "RayMetricsMirror",
        "build_app",
    ]
    assert all(hasattr(app_pkg, name) for name in app_pkg.__all__)


def test_the_operators_import_path_names_build_app() -> None:
    # A RayService's serveConfigV2 imports the builder by this path.
    module, _, attribute = IMPORT_PATH.partition(":")
    assert getattr(importlib.import_module(module), attribute) is app_pkg.build_app
