"""The objects beside the RayService: the JWT key's Secret, the chat Service and the
ServiceMonitor that scrapes every replica's metrics."""

from __future__ import annotations

import base64
from typing import Any

from chatfleet.operator._models import ChatDeploymentSpec
from chatfleet.operator._names import (
    JWT_SECRET_KEY,
    MANAGED_BY,
    OWNER_LABEL,
    RAY_METRICS_PORT,
    _meta,
    jwt_secret_name,
    service_name,
)


def build_jwt_secret(name: str, namespace: str, signing_key: str) -> dict[str, Any]:
    """The Secret holding the JWT signing key (the handler creates it once)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(jwt_secret_name(name), namespace, name),
        "type": "Opaque",
        "data": {JWT_SECRET_KEY: base64.b64encode(signing_key.encode()).decode()},
    }


def build_service(name: str, namespace: str, spec: ChatDeploymentSpec) -> dict[str, Any]:
    """The Service in front of the Ray Serve proxies (the chat API and its /metrics)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(name), namespace, name),
        "spec": {
            "type": spec.cluster.service_type,
            # KubeRay labels the pods whose Serve proxy is ready with ray.io/serve=true.
            "selector": {OWNER_LABEL: name, "ray.io/serve": "true"},
            "ports": [
                {
                    "name": "http",
                    "port": spec.serving.server.port,
                    "targetPort": spec.serving.server.port,
                    "protocol": "TCP",
                },
                {
                    "name": "ray-metrics",
                    "port": RAY_METRICS_PORT,
                    "targetPort": RAY_METRICS_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


# Ray's metrics agent exports the ingress replicas' chatfleet_* metrics as ray_chatfleet_*
# (one series per replica); the dashboards and alerts use the plain names.
METRIC_RELABELINGS: list[dict[str, Any]] = [
    {
        "sourceLabels": ["__name__"],
        "regex": "ray_(chatfleet_.*)",
        "targetLabel": "__name__",
        "replacement": "$1",
        "action": "replace",
    }
]


def build_service_monitor(name: str, namespace: str) -> dict[str, Any]:
    """A Prometheus-operator ServiceMonitor scraping every Serve pod's Ray metrics port.

    That port carries Ray's, Ray Serve's and every replica's chatfleet metrics. The
    API port's ``/metrics`` is not scraped: behind the proxy it answers for one random
    ingress replica, and scraped per pod it would count that replica twice.
    """
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(service_name(name), namespace, name),
        "spec": {
            "selector": {"matchLabels": {OWNER_LABEL: name, **MANAGED_BY}},
            "endpoints": [
                {
                    "port": "ray-metrics",
                    "path": "/metrics",
                    "interval": "30s",
                    "metricRelabelings": METRIC_RELABELINGS,
                },
            ],
        },
    }
