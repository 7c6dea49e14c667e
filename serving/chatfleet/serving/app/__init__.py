"""Ray Serve wiring: the only place deployments are bound.

``build_app`` is the application builder that ``serve run``, ``chatfleet serve``
and a RayService's serveConfigV2 (``import_path: chatfleet.serving.app:build_app``)
use. It lays out one ``EngineDeployment`` per model and one ``Ingress`` that
hosts the FastAPI app; the ingress streams straight from the engine chosen for a
request, one handle hop, with tokens already batched by the engine replica.

One module per concept: ``_engine`` (`EngineDeployment`), ``_routing`` (the
classifier and compressor deployments), ``_ingress`` (`Ingress`, which also runs the
router for ``model: "auto"``), ``_handles`` (the clients the ingress calls other
deployments through),
``_admission`` (how long a request waits for a full model's replica, then 429),
``_metrics`` (`RayMetricsMirror`), ``_replica`` (what every replica shares) and
``_build`` (`build_app`, `APP_NAME`).
"""

from chatfleet.serving.app._build import APP_NAME, build_app
from chatfleet.serving.app._engine import EngineDeployment
from chatfleet.serving.app._ingress import Ingress
from chatfleet.serving.app._metrics import RayMetricsMirror
from chatfleet.serving.app._routing import ClassifierDeployment, CompressorDeployment

__all__ = [
    "APP_NAME",
    "ClassifierDeployment",
    "CompressorDeployment",
    "EngineDeployment",
    "Ingress",
    "RayMetricsMirror",
    "build_app",
]
