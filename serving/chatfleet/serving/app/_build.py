"""``build_app``: the only place deployments are bound."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatfleet.serving.app._engine import EngineDeployment
from chatfleet.serving.app._ingress import Ingress
from chatfleet.serving.app._routing import ClassifierDeployment, CompressorDeployment
from chatfleet.serving.config import (
    AppConfig,
    CoalesceConfig,
    ModelConfig,
    TelemetryConfig,
    load_config,
)

APP_NAME = "chatfleet"


def _deployment(decorated: object) -> Any:
    """A ``@serve.deployment`` class as Ray sees it (its stubs keep the bare class)."""
    return decorated


def _engine_deployment(
    model: ModelConfig, coalescing: CoalesceConfig, tracing: TelemetryConfig
) -> Any:
    return (
        _deployment(EngineDeployment)
        .options(
            name=f"engine-{model.name}",
            num_replicas=model.num_replicas,
            max_ongoing_requests=model.max_ongoing_requests,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
        )
        .bind(model, coalescing, tracing)
    )


def build_app(args: AppConfig | Mapping[str, Any] | None = None) -> Any:
    """Build the chatfleet Ray Serve application.

    ``args`` is an `AppConfig`, a mapping of its fields (serveConfigV2 ``args``),
    ``{"config_file": path}``, or nothing (environment and defaults).
    """
    if isinstance(args, AppConfig):
        config = args
    elif args and set(args) == {"config_file"}:
        config = load_config(Path(str(args["config_file"])))
    else:
        config = load_config(overrides=dict(args or {}))
    engines = {
        m.name: _engine_deployment(m, config.coalesce, config.telemetry) for m in config.models
    }
    classifier = compressor = None
    if config.classifier is not None:
        c = config.classifier
        classifier = (
            _deployment(ClassifierDeployment)
            .options(
                name="classifier",
                num_replicas=c.num_replicas,
                ray_actor_options={"num_cpus": c.num_cpus, "num_gpus": c.num_gpus},
            )
            .bind(c, config.telemetry)
        )
    if config.compressor is not None:
        z = config.compressor
        compressor = (
            _deployment(CompressorDeployment)
            .options(
                name="compressor",
                num_replicas=z.num_replicas,
                ray_actor_options={"num_cpus": z.num_cpus, "num_gpus": z.num_gpus},
            )
            .bind(z, config.telemetry)
        )
    return (
        _deployment(Ingress)
        .options(
            name="ingress",
            num_replicas=config.ingress.num_replicas,
            max_ongoing_requests=config.ingress.max_ongoing_requests,
            ray_actor_options={"num_cpus": config.ingress.num_cpus},
        )
        .bind(config, engines, classifier, compressor)
    )
