"""Tracing: OpenTelemetry spans and their OTLP export."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chatfleet.serving.config._base import _Model


class TelemetryConfig(_Model):
    """OpenTelemetry traces: one trace per request, exported over OTLP when configured."""

    service_name: str = Field(
        "chatfleet", min_length=1, max_length=200, description="Resource service.name of spans."
    )
    otlp_endpoint: str = Field(
        "",
        max_length=2048,
        description=(
            "OTLP collector URL (http/protobuf: http://host:4318, gRPC: http://host:4317);"
            " empty: no exporter and tracing costs nothing."
        ),
    )
    otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="OTLP transport to the collector."
    )
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Fraction of new traces recorded (parent-based)."
    )
    headers_env: str = Field(
        "OTEL_EXPORTER_OTLP_HEADERS",
        min_length=1,
        max_length=200,
        description="Environment variable with exporter headers as k=v,k2=v2 (e.g. an API key).",
    )
    export_delay_ms: int = Field(
        5000, ge=1, le=600_000, description="Longest wait before a batch of spans is exported."
    )
