"""The ingress side: its HTTP server, Ray resources and WebSockets, and how
engines batch tokens on their way to it."""

from __future__ import annotations

from pydantic import Field, model_validator

from chatfleet.serving.config._base import _Model

#: Past the drain timeout: interrupted streams send their terminal events, files are polled.
DRAIN_MARGIN_S = 10.0


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
    drain_timeout_s: float = Field(
        20.0,
        ge=0,
        le=3600,
        description="On SIGTERM/SIGINT (or a drain request) streams in flight may finish for"
        " this long while new requests get 503 shutting_down; the rest then end with a"
        " terminal event (finish_reason interrupted). Kept below Kubernetes' default 30 s"
        " terminationGracePeriodSeconds; the operator sizes the pods' grace period from it.",
    )

    @property
    def shutdown_grace_s(self) -> float:
        """How long a replica needs to stop cleanly: the drain, the terminal events of the
        streams it interrupts, and a margin (Serve's graceful_shutdown_timeout_s)."""
        return self.drain_timeout_s + DRAIN_MARGIN_S


class IngressDeploymentConfig(_Model):
    """Ray resources of the ingress (HTTP/SSE/WebSocket) deployment."""

    num_replicas: int = Field(
        2,
        ge=1,
        le=1000,
        description="Ingress replicas. Two by default: a replica that dies or restarts leaves"
        " HTTP and new sockets to the other (its own streams and sockets end; clients"
        " reconnect), and a burst of new requests is parsed, routed and started on two cores"
        " instead of one (bench/aiperf.py: 256 streams restarted together wait half as long"
        " for their first token).",
    )
    num_cpus: float = Field(0.1, ge=0, le=64, description="CPUs each ingress replica reserves.")
    max_ongoing_requests: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Concurrent HTTP requests one ingress replica serves (a stream counts"
        " until its last byte); more get 429 server_busy. WebSockets are not counted here:"
        " they have websocket.max_connections.",
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


class CoalesceConfig(_Model):
    """How engines batch tokens into messages on their way to the ingress.

    Every message from an engine replica to the ingress costs CPU on both sides
    (about 0.1 ms each through a Serve handle, a few µs on the token relay), so one
    message per token caps a replica at a few thousand tokens/s; batching lifts that
    cap. Batching is Nagle-like: a token goes out at once when nothing went out in
    the last ``max_delay_ms``, otherwise with the next batch, at most that long after
    the previous one. The count only matters for bursts, where everything is ready at
    once and fewer, larger messages cost less (256 rather than 64 took
    bench/gateway.py from 0.72x to 1.5x the naive server). Under load a stream's
    batches grow further (``max_messages_per_s``): at 256 streams of 50 tokens/s on
    one engine replica, 1,500 messages/s (a batch per stream every 150 ms) rather than
    3,000 (every 60 ms) took a quarter off the CPU of chatfleet's processes and cut
    the time to first token that a burst of new requests waits for
    (bench/aiperf.py; README).
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
        1500,
        ge=1,
        le=1_000_000,
        description="Messages per second one engine replica aims to stay under: with more"
        " streams than this rate allows at max_delay_ms, each stream's delay grows (streams /"
        " this rate), up to max_delay_under_load_ms. Every message costs CPU, so under load"
        " fewer, larger ones keep all streams on time instead of all falling behind.",
    )
    max_delay_under_load_ms: float = Field(
        150.0,
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
