"""chatfleet's Kubernetes operator: ChatDeployment → KubeRay RayService.

Public surface: the resource models, the pure builders, the CRD generator and
the Kopf registry factory. Everything else lives in private modules.

The Kopf side (`Reconciler`, `build_registry`, `parse_spec`, `InvalidSpecError`)
is imported on first use: the models, builders and CRD need only pydantic, so
``chatfleet-operator --help`` and ``crd`` work where only the serving extra is
installed, and a missing ``kopf`` is reported naming the extra.
"""

from typing import TYPE_CHECKING, Any

from chatfleet.operator._builders import build_rayservice, serve_config
from chatfleet.operator._crd import crd_schema, render_crd, render_crd_yaml
from chatfleet.operator._models import (
    ChatDeploymentSpec,
    ChatDeploymentStatus,
    ClusterSpec,
    Condition,
    CPUWorkerGroup,
    GPUWorkerGroup,
    HeadGroup,
    SecretKeyRef,
)
from chatfleet.operator._objects import (
    METRIC_RELABELINGS,
    build_jwt_secret,
    build_service,
    build_service_monitor,
)
from chatfleet.operator._settings import OperatorSettings

if TYPE_CHECKING:
    from chatfleet.operator._operator import (
        InvalidSpecError,
        Reconciler,
        build_registry,
        parse_spec,
    )

#: How to install what the Kopf side needs (named in every "missing" message).
_OPERATOR_EXTRA = "pip install 'chatfleet[operator]'"
_KOPF_NAMES = frozenset({"InvalidSpecError", "Reconciler", "build_registry", "parse_spec"})

__all__ = [
    "METRIC_RELABELINGS",
    "CPUWorkerGroup",
    "ChatDeploymentSpec",
    "ChatDeploymentStatus",
    "ClusterSpec",
    "Condition",
    "GPUWorkerGroup",
    "HeadGroup",
    "InvalidSpecError",
    "OperatorSettings",
    "Reconciler",
    "SecretKeyRef",
    "build_jwt_secret",
    "build_rayservice",
    "build_registry",
    "build_service",
    "build_service_monitor",
    "crd_schema",
    "parse_spec",
    "render_crd",
    "render_crd_yaml",
    "serve_config",
]


def __getattr__(name: str) -> Any:
    if name not in _KOPF_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from chatfleet.operator import _operator
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"chatfleet.operator.{name} needs {exc.name or 'kopf'}, part of the operator"
            f" extra: {_OPERATOR_EXTRA}",
            name=exc.name,
        ) from exc
    return getattr(_operator, name)
