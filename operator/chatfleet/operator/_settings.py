"""Operator settings: environment variables under ``CHATFLEET_OPERATOR_``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatfleet.serving.config import TelemetryConfig

ENV_PREFIX = "CHATFLEET_OPERATOR_"


class OperatorSettings(BaseSettings):
    """How the operator runs (not what it deploys: that is the ChatDeployment)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch (JSON list); empty watches the whole cluster.",
    )
    peering: str | None = Field(
        None,
        description="Kopf peering name for more than one replica; empty runs standalone.",
    )
    priority: int | None = Field(
        None,
        ge=0,
        description="Peering priority: the highest-priority replica works, the others stand"
        " by. Empty picks a random one per process (equal priorities would all pause).",
    )
    metrics_host: str = Field("0.0.0.0", description="Address of the /metrics server.")
    metrics_port: int = Field(
        8080, ge=0, le=65535, description="Port of the /metrics server; 0 picks a free one."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics.")
    missing_secret_retry_s: float = Field(
        30.0, gt=0, description="Retry delay while a referenced Secret does not exist."
    )
    forbidden_retry_s: float = Field(
        20.0, gt=0, description="Retry delay while RBAC refuses the operator a request."
    )
    kubeconfig: str | None = Field(
        None, description="Kubeconfig path outside a cluster; empty uses the default."
    )
    api_timeout_s: float = Field(30.0, gt=0, description="Timeout of one API request.")
    post_events: bool = Field(True, description="Post Kubernetes Events for the objects.")
    otlp_endpoint: str = Field(
        "", description="OTLP collector URL for reconcile traces; empty: no tracing."
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="OTLP transport to the collector."
    )
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="Fraction of reconciles traced.")

    def telemetry(self) -> TelemetryConfig:
        """The tracing settings, in the serving app's terms."""
        return TelemetryConfig(
            service_name="chatfleet-operator",
            otlp_endpoint=self.otlp_endpoint,
            otlp_protocol=self.otlp_protocol,
            sample_ratio=self.trace_sample_ratio,
        )
