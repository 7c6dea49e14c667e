"""The ChatDeployment resource as pydantic models: its spec, its status, its identity.

``spec.serving`` IS `chatfleet.serving.config.AppConfig` (the same schema that
``chatfleet serve --config`` reads, snake_case like that file); ``spec.cluster``
holds what only exists in a cluster and follows Kubernetes' camelCase. The CRD
(`chatfleet.operator.render_crd`) is generated from these models, so every field
description here is user-facing documentation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from chatfleet.serving.config import AppConfig

GROUP = "chatfleet.dev"
VERSION = "v1alpha1"
KIND = "ChatDeployment"
PLURAL = "chatdeployments"
SINGULAR = "chatdeployment"
SHORT_NAMES = ("chatd",)
API_VERSION = f"{GROUP}/{VERSION}"
# KubeRay names a RayService's RayCluster "<name>-<5 chars>" and its Services and pod
# labels after that (63-character label values): keep room for the suffixes.
MAX_NAME_LENGTH = 40

DEFAULT_IMAGE = "ghcr.io/chatfleet/chatfleet-serving:0.1.0"
DEFAULT_OLLAMA_IMAGE = "docker.io/ollama/ollama:0.12.3"
GPU_RESOURCE = "nvidia.com/gpu"

# A Kubernetes quantity ("500m", "2", "1.5Gi"), the API server's own pattern.
_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# DNS-1123 subdomain (Secret names) and label-ish keys.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"


class _Model(BaseModel):
    """Cluster-side models: camelCase in YAML, snake_case in Python."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class ComputeResources(_Model):
    """CPU and memory of one container, as Kubernetes quantities."""

    cpu: str = Field(..., pattern=_QUANTITY, description="CPU, e.g. '500m' or '2'.")
    memory: str = Field(..., pattern=_QUANTITY, description="Memory, e.g. '2Gi'.")


class Resources(_Model):
    """Requests (what the scheduler reserves) and limits (the cap) of a Ray container."""

    requests: ComputeResources = Field(..., description="Reserved resources.")
    limits: ComputeResources = Field(..., description="Resource caps.")


class Toleration(_Model):
    """A Kubernetes toleration, so Ray pods may run on tainted (e.g. GPU) nodes."""

    key: str | None = Field(None, max_length=316, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="How key/value match.")
    value: str | None = Field(None, max_length=63, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="With NoExecute: how long the pod stays after the taint."
    )

    @model_validator(mode="after")
    def _value_needs_equal(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value must be empty with Exists")
        return self


class _PodPlacement(_Model):
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pods tolerate."
    )


def _head_resources() -> Resources:
    return Resources(
        requests=ComputeResources(cpu="1", memory="2Gi"),
        limits=ComputeResources(cpu="2", memory="4Gi"),
    )


def _cpu_worker_resources() -> Resources:
    return Resources(
        requests=ComputeResources(cpu="2", memory="4Gi"),
        limits=ComputeResources(cpu="4", memory="8Gi"),
    )


def _gpu_worker_resources() -> Resources:
    return Resources(
        requests=ComputeResources(cpu="4", memory="16Gi"),
        limits=ComputeResources(cpu="8", memory="32Gi"),
    )


class HeadGroup(_PodPlacement):
    """The Ray head pod. It also runs the ingress and the CPU-light deployments."""

    resources: Resources = Field(
        default_factory=_head_resources, description="Resources of the Ray head container."
    )


class _WorkerGroup(_PodPlacement):
    replicas: int = Field(1, ge=0, le=1000, description="Worker pods to start with.")
    min_replicas: int = Field(0, ge=0, le=1000, description="Fewest worker pods.")
    max_replicas: int = Field(4, ge=0, le=1000, description="Most worker pods.")

    @model_validator(mode="after")
    def _bounds(self) -> _WorkerGroup:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError("need minReplicas <= replicas <= maxReplicas")
        return self


class CPUWorkerGroup(_WorkerGroup):
    """Ray worker pods without accelerators (small models, classifier, compressor)."""

    resources: Resources = Field(
        default_factory=_cpu_worker_resources, description="Resources of each worker container."
    )


class GPUWorkerGroup(_WorkerGroup):
    """Ray worker pods with NVIDIA GPUs (vLLM, Ollama, large transformers models)."""

    gpus_per_pod: int = Field(
        1, ge=1, le=16, description="GPUs each worker pod gets (nvidia.com/gpu limit)."
    )
    resources: Resources = Field(
        default_factory=_gpu_worker_resources, description="Resources of each worker container."
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the ChatDeployment's namespace."""

    name: str = Field(
        ..., min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN, description="Secret name."
    )
    key: str = Field(
        ..., min_length=1, max_length=253, pattern=_SECRET_KEY, description="Key inside the Secret."
    )


class OllamaSidecar(_Model):
    """The Ollama server put beside Ray in the pods that may host an Ollama model.

    A model with num_gpus > 0 runs on the GPU workers, one without on the head and
    CPU workers; those pods get the sidecar, which pulls the models at start. Only
    models whose base_url is localhost use it. On GPU pods the device plugin gives
    the GPUs to the Ray container and the sidecar reaches them through the NVIDIA
    runtime (NVIDIA_VISIBLE_DEVICES=all).
    """

    image: str = Field(DEFAULT_OLLAMA_IMAGE, min_length=1, description="Ollama image.")
    resources: ComputeResources | None = Field(
        None, description="Requests of the sidecar container; empty sets none."
    )


class ClusterSpec(_Model):
    """What the serving application needs from the cluster: images, pods, Secrets."""

    image: str = Field(
        DEFAULT_IMAGE, min_length=1, description="Serving image (Ray + chatfleet[serving])."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    ray_version: str = Field("2.60.0", min_length=1, description="Ray version in the image.")
    head: HeadGroup = Field(default_factory=HeadGroup, description="The Ray head pod.")
    cpu_workers: CPUWorkerGroup | None = Field(
        None, description="CPU worker group; empty runs everything on the head."
    )
    gpu_workers: GPUWorkerGroup | None = Field(
        None, description="GPU worker group; required when a model asks for GPUs."
    )
    ollama: OllamaSidecar = Field(
        default_factory=OllamaSidecar,
        description="Sidecar added to the pods that host an Ollama model.",
    )
    jwt_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "Secret key holding the JWT signing key; empty makes the operator create"
            " '<name>-jwt' once (it is never rotated silently)."
        ),
    )
    database_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the database URL; empty uses SQLite in the pod."
    )
    env_from_secrets: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets loaded as environment variables into every Ray pod (API keys).",
    )
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Type of the Service in front of the ingress."
    )
    service_monitor: bool = Field(
        True, description="Create a ServiceMonitor when the Prometheus operator's CRD exists."
    )
    http_proxy: Literal["haproxy", "serve"] = Field(
        "haproxy",
        description="What answers on each Ray pod's HTTP port: HAProxy (Ray Serve's"
        " throughput mode; it forwards straight to the ingress replicas' own ports) or"
        " Serve's Python proxy actor, which costs an extra hop per request.",
    )


class ChatDeploymentSpec(_Model):
    """A whole chat service: the serving application and the cluster it runs on."""

    serving: AppConfig = Field(
        default_factory=AppConfig,
        description="The serving application (same schema as `chatfleet serve --config`).",
    )
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Cluster layout.")

    @model_validator(mode="after")
    def _placement_exists(self) -> ChatDeploymentSpec:
        serving = self.serving
        needs_gpu = [f"model {m.name}" for m in serving.models if m.num_gpus > 0]
        for part in ("classifier", "compressor"):
            config = getattr(serving, part)
            if config is not None and config.num_gpus > 0:
                needs_gpu.append(part)
        if needs_gpu and self.cluster.gpu_workers is None:
            raise ValueError(
                f"{', '.join(needs_gpu)} ask for GPUs (num_gpus > 0)"
                " but spec.cluster.gpuWorkers is empty"
            )
        if serving.store.url is not None:
            raise ValueError(
                "spec.serving.store.url would be stored in plain text: put the URL in a Secret"
                " and reference it with spec.cluster.databaseSecretRef"
            )
        inline_keys = [m.name for m in serving.models if m.openai and m.openai.api_key]
        if inline_keys:
            raise ValueError(
                f"models {', '.join(inline_keys)}: an inline openai.api_key would be stored in"
                " plain text; set api_key_env and load it with spec.cluster.envFromSecrets"
            )
        return self


ConditionType = Literal["Ready", "Progressing", "Degraded", "InvalidSpec"]


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: ConditionType = Field(..., description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="Condition status.")
    reason: str = Field(..., max_length=1024, description="CamelCase machine-readable reason.")
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(..., description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation the condition was computed from."
    )


class ChatDeploymentStatus(_Model):
    """What the operator observed."""

    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation the operator last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=8, description="Ready, Progressing, Degraded, InvalidSpec."
    )
    endpoint: str | None = Field(None, description="In-cluster URL of the chat API.")
    models: str | None = Field(None, description="Served model names, comma-separated.")
    ray_service: str | None = Field(None, description="Name of the owned RayService.")
    service_status: str | None = Field(
        None, description="The RayService's serviceStatus as KubeRay reports it."
    )
