"""``build_app``: the only place deployments are bound."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.serve.config import RequestRouterConfig

from chatfleet.serving.app._affinity import AffinityRouter
from chatfleet.serving.app._engine import EngineDeployment
from chatfleet.serving.app._ingress import Ingress
from chatfleet.serving.app._offers import DefaultRouter
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
        .options(**engine_options(model))
        .bind(model, coalescing, tracing)
    )


def engine_options(model: ModelConfig) -> dict[str, Any]:
    """Ray Serve options of ``model``'s engine deployment: replicas, admission, routing."""
    admitted = model.admitted_requests()
    replicas: dict[str, Any] = (
        {"num_replicas": model.num_replicas}
        if model.autoscaling is None
        else {"autoscaling_config": model.autoscaling.serve_options(admitted)}
    )
    return {
        "name": f"engine-{model.name}",
        **replicas,
        "max_ongoing_requests": admitted,
        # Counted by each ingress replica's router. The wait is also bounded in time,
        # by the ingress (HandleEngineClient), which refuses both alike.
        "max_queued_requests": model.queued_requests(),
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
        **_routing(model),
    }


def _routing(model: ModelConfig) -> dict[str, Any]:
    """The request router: conversation affinity (`AffinityRouter`), or Serve's default;
    both send the request ahead on the token relay's link (`SendsAhead`)."""
    router_class: Any  # Ray's annotation says dict; it takes a class
    if model.routes_by_affinity():
        kwargs = {"model": model.name, "max_imbalance": model.affinity.max_imbalance}
        router_class = AffinityRouter
    else:
        kwargs, router_class = {}, DefaultRouter
    router = RequestRouterConfig(request_router_class=router_class, request_router_kwargs=kwargs)
    return {"request_router_config": router}


def ingress_max_ongoing_requests(config: AppConfig) -> int:
    """What Serve lets into one ingress replica: its HTTP budget plus its sockets.

    Serve counts an open WebSocket as an ongoing request for its whole life; were the
    ingress's limit the HTTP budget alone, idle sockets would fill it and every HTTP
    request (``/healthz`` included) would queue behind them. So Serve's limit leaves
    room for every socket the app accepts (``/ws/chat`` and ``/ws`` each take up to
    ``websocket.max_connections``), and the app admits HTTP requests against its own
    budget (``chatfleet.serving.api``'s HTTP admission) and sockets against theirs.
    """
    return config.ingress.max_ongoing_requests + 2 * config.websocket.max_connections


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
            max_ongoing_requests=ingress_max_ongoing_requests(config),
            ray_actor_options={"num_cpus": config.ingress.num_cpus},
        )
        .bind(config, engines, classifier, compressor)
    )
