"""The engine contract: one async generator of chunks per request."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.protocol import Chunk, GenerationRequest


class Engine(abc.ABC):
    """Runs one model. Subclasses implement `stream`; `start` loads, `close` frees.

    `stream` yields chunks in order; the last one carries ``finish_reason`` and
    ``usage``. Failures raise a `chatfleet.serving.errors.EngineError`. When the
    consumer stops iterating (client gone), the generator is closed and the
    engine must stop generating: implementations put their clean-up in
    ``finally`` blocks.
    """

    def __init__(self, model: ModelConfig) -> None:
        self.model = model

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def runs_ahead(self) -> bool:
        """Whether the engine goes on generating while nobody reads its stream.

        True of anything that decodes on its own (a GPU, a thread, a remote server):
        `coalesce` may then leave the stream unread until a batch is due and take
        what piled up in one go. An engine that only computes a chunk when asked
        says False, and is read eagerly.
        """
        return True

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open connections. Called once before any `stream`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what `start` took."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Generate the answer to ``request`` chunk by chunk."""
