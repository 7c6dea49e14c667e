"""How many requests a model's replicas admit, how long the rest may wait, and how many
replicas it runs: `AdmissionConfig`, `AutoscalingConfig`, and the per-engine defaults;
and which replica a request goes to: `AffinityConfig`.

One number fits no engine: a remote API or Ollama is I/O-bound and takes hundreds of
streams, vLLM batches ``max_num_seqs`` sequences, the transformers engine runs
``max_concurrency`` generations. So each engine has its own default for how many
requests one replica admits (`engine_admission_default`), and what does not fit waits
for a replica, bounded in count and in time, and is then refused (429 with
``Retry-After``) rather than queued for minutes.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from chatfleet.serving.config._base import _Model

#: I/O-bound engines (a remote API, Ollama, the simulator): a replica mostly waits.
_IO_BOUND_ADMISSION = 1000
#: vLLM's own default ``max_num_seqs`` (sequences it batches per step).
_VLLM_MAX_NUM_SEQS = 256
#: Requests the transformers engine holds beyond those it runs, so the next starts at once.
_TRANSFORMERS_QUEUE = 2
#: How often a scaled-to-zero model's handles sample and report their queued requests
#: (Serve's ``metrics_interval_s``; its default is 10 s). Ray Serve 2.60 reports a first
#: request at zero replicas at once, but with the handle's earlier samples (all zero)
#: instead of the request (``RouterMetricsManager._get_metrics_report``), so the replica
#: was only asked for at the next sample and report: 8-9 s of a 9-11 s cold start on
#: bench/cold_start.py. At 1 s the controller hears of it within about 2 s; the cost is
#: one small report a second per ingress replica and such model.
_SCALE_FROM_ZERO_METRICS_INTERVAL_S = 1.0


def engine_admission_default(engine: str, settings: _Model | None) -> int:
    """Requests one replica of ``engine`` admits when the model does not say."""
    if engine == "vllm":
        engine_args: dict[str, Any] = getattr(settings, "engine_args", {})
        return int(engine_args.get("max_num_seqs", _VLLM_MAX_NUM_SEQS))
    if engine == "transformers":
        return int(getattr(settings, "max_concurrency", 1)) + _TRANSFORMERS_QUEUE
    return _IO_BOUND_ADMISSION


class AdmissionConfig(_Model):
    """What happens to a request when every replica of the model is full."""

    max_queued_requests: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Requests that may wait for a replica, per ingress replica; more are"
        " refused at once (429). Empty: as many as one replica admits.",
    )
    max_queue_wait_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Longest a request waits for a replica before it is refused (429)."
        " A model that scales to zero waits at least autoscaling.cold_start_timeout_s.",
    )
    retry_after_s: int = Field(
        2, ge=1, le=3600, description="Retry-After sent with a refusal, in seconds."
    )


class AutoscalingConfig(_Model):
    """Ray Serve autoscaling of a model's replicas (replaces num_replicas)."""

    min_replicas: int = Field(
        1,
        ge=0,
        le=1000,
        description="Fewest replicas; 0 scales the model to zero when idle (the next"
        " request waits while a replica starts).",
    )
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, le=1000, description="Replicas at deploy time; empty means min_replicas."
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Ongoing requests per replica Serve scales towards;"
        " empty means half of what a replica admits.",
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, le=3600, description="Load must stay high this long before scaling up."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, le=86_400, description="Load must stay low this long before scaling down."
    )
    downscale_to_zero_delay_s: float | None = Field(
        None,
        ge=0,
        le=86_400,
        description="Idle time before the last replica goes (min_replicas 0);"
        " empty means downscale_delay_s.",
    )
    cold_start_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="How long a request waits while no replica runs (scaled to zero, or"
        " all starting; model load included): streams are told at once that the model is"
        " loading; past this it is refused (503 model_starting, Retry-After).",
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must not exceed max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("autoscaling.initial_replicas must be within min and max")
        return self

    def serve_options(self, admitted: int) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config``, for replicas that admit ``admitted`` each."""
        target = self.target_ongoing_requests or max(1.0, admitted / 2)
        options: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            options["initial_replicas"] = self.initial_replicas
        if self.downscale_to_zero_delay_s is not None:
            options["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.min_replicas == 0:
            # Deprecated in Serve's schema for environment variables Ray 2.60 does not
            # read yet; its router still takes the interval from here.
            options["metrics_interval_s"] = _SCALE_FROM_ZERO_METRICS_INTERVAL_S
        return options


class AffinityConfig(_Model):
    """Conversation affinity: a request goes to the replica that already holds its
    prompt's KV cache (the one that ran the conversation's earlier turns, or another
    request with the same long prefix), or to the less loaded of two when that one is
    full. A key per request is hashed onto the live replicas (rendezvous hashing), so
    adding a replica moves only the keys that now fall on it."""

    enabled: bool | None = Field(
        None,
        description="Route by affinity. Empty: on when the model runs more than one"
        " replica (num_replicas above 1, or autoscaling).",
    )
    prefix_chars: int = Field(
        2048,
        ge=16,
        le=1_000_000,
        description="Without a conversation id, requests share a replica when the"
        " conversation's opening (messages up to the first user message) agrees in this"
        " many first characters: the turns of one chat, or prompts on one long system"
        " prompt.",
    )
    max_imbalance: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Leave the affine replica when it runs this many more requests than"
        " the least loaded one. Empty: only when it is full (max_ongoing_requests).",
    )
