"""chatfleet's Kubernetes operator: ChatDeployment → KubeRay RayService.

Public surface: the resource models, the pure builders, the CRD generator and
the Kopf registry factory. Everything else lives in private modules.
"""

from chatfleet.operator._builders import (
    METRIC_RELABELINGS,
    build_jwt_secret,
    build_rayservice,
    build_service,
    build_service_monitor,
    serve_config,
)
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
from chatfleet.operator._operator import (
    InvalidSpecError,
    Reconciler,
    build_registry,
    parse_spec,
)
from chatfleet.operator._settings import OperatorSettings

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
