"""`generation_request`: a chat request checked against a model and built into the
`GenerationRequest` its engine receives (limits, sampling, replica affinity)."""

from __future__ import annotations

from chatfleet.serving.api._affinity import affinity_key
from chatfleet.serving.api._capabilities import checked_sampling
from chatfleet.serving.api._schemas import SamplingFields
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.errors import RequestError
from chatfleet.serving.protocol import GenerationRequest, Message


def generation_request(
    model: ModelConfig,
    messages: list[Message],
    sampling: SamplingFields,
    max_messages: int,
    conversation: tuple[str | None, str] | None = None,
) -> GenerationRequest:
    """``messages`` and ``sampling`` for ``model``; `RequestError` past its limits."""
    if len(messages) > max_messages:
        raise RequestError(f"at most {max_messages} messages per request", param="messages")
    limits = model.defaults
    max_tokens = sampling.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise RequestError(
            f"max_tokens {max_tokens} exceeds this model's limit of {limits.max_tokens_limit}",
            param="max_tokens",
        )
    extras = checked_sampling(model, sampling)  # what the engine lacks is refused
    return GenerationRequest(
        model=model.name,
        messages=messages,
        max_tokens=max_tokens,
        temperature=limits.temperature if sampling.temperature is None else sampling.temperature,
        top_p=limits.top_p if sampling.top_p is None else sampling.top_p,
        stop=sampling.stop_list(),
        seed=sampling.seed,
        sampling=extras,
        affinity_key=affinity_key(model, messages, conversation),
        **sampling.tooling(),
    )
