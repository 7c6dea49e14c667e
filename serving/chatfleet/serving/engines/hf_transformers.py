"""A Hugging Face causal LM run in-process with transformers, on CPU or GPU.

`TransformersEngine.stream` renders the conversation with the tokenizer's chat
template and runs ``model.generate`` on one of the engine's ``max_concurrency``
generation threads. A streamer decodes the new tokens incrementally in that
thread (stop strings are matched there too) and hands text pieces to the event
loop with ``call_soon_threadsafe``; the event loop splits ``<think>`` reasoning
from the answer and yields chunks. When the consumer closes the stream, a flag
checked by a stopping criterion after every token ends the generation, and the
stream waits for it to end before it releases its concurrency slot.

The threads live as long as the engine: torch keeps per-thread state (OpenMP
teams), which a thread per request would rebuild, and which a thread still
exiting when the interpreter finalizes aborts with "terminate called".

Without ``model`` the engine serves the embedded SmolLM2-135M-Instruct
(`chatfleet.serving.embedded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chatfleet.serving.config import ModelConfig, TransformersEngineConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._thinking import OPEN_TAG, ThinkSplitter
from chatfleet.serving.errors import (
    ChatfleetError,
    EngineError,
    EngineUnavailable,
    PayloadTooLarge,
    RequestError,
)
from chatfleet.serving.protocol import Chunk, FinishReason, GenerationRequest, TokenLogprob, Usage

try:
    import jinja2
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        StoppingCriteriaList,
    )

    # Imports torch and transformers too: inside the guard.
    from chatfleet.serving.engines._hf_streaming import (
        Done,
        Job,
        LogprobRecorder,
        Piece,
        PieceStreamer,
        Prompt,
        Sampler,
        StopWhenSet,
        first_line,
    )
except ImportError as exc:  # pragma: no cover - depends on the install
    raise EngineUnavailable(
        "the transformers engine needs torch and transformers: pip install 'chatfleet[serving]'"
    ) from exc

__all__ = ["TransformersEngine"]

logger = logging.getLogger(__name__)

#: Prompt tokens decoded in front of the first new token, so that tokenizers
#: which drop a word's leading space at the start of a text keep it (as vLLM does).
_DETOKENIZE_CONTEXT = 5


class TransformersEngine(Engine):
    """Streams chat completions from a local causal LM (``model.transformers`` settings)."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        self.settings: TransformersEngineConfig = model.transformers or TransformersEngineConfig()
        self._tokenizer: Any = None
        self._model: Any = None
        self._device = "cpu"
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id: int | None = None
        self._context_length: int | None = None
        self._slots = asyncio.Semaphore(self.settings.max_concurrency)
        self._active: set[threading.Event] = set()
        self._threads: ThreadPoolExecutor | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def start(self) -> None:
        if self.loaded:
            return
        if self._threads is None:
            self._threads = ThreadPoolExecutor(
                max_workers=self.settings.max_concurrency,
                thread_name_prefix=f"chatfleet-generate-{self.name}",
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self._load)

    async def close(self) -> None:
        for stop in list(self._active):
            stop.set()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        self._model = None
        self._tokenizer = None
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        if not self.loaded or self._threads is None:
            raise EngineUnavailable(f"model {self.name!r} is not loaded")
        async with self._slots:
            loop = asyncio.get_running_loop()
            job = Job(loop, asyncio.Queue())
            self._active.add(job.stop)
            finished = loop.run_in_executor(self._threads, self._generate, request, job)
            try:
                async with contextlib.aclosing(self._chunks(request, job)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                # Reached on completion, on errors, and when the consumer closes the
                # stream (GeneratorExit) or is cancelled: stop the generation and wait
                # for it, so that the slot is only freed once the model is really idle.
                job.stop.set()
                self._active.discard(job.stop)
                if not finished.done():
                    # Shielded: a second cancellation stops the waiting, not the flag.
                    await asyncio.shield(finished)

    async def _chunks(self, request: GenerationRequest, job: Job) -> AsyncGenerator[Chunk, None]:
        splitter: ThinkSplitter | None = None
        prompt_tokens = 0
        unreported = 0  # tokens whose text has not been yielded yet
        logprobs: tuple[TokenLogprob, ...] = ()  # and their logprobs
        reported = 0
        while True:
            event = await job.events.get()
            if isinstance(event, Prompt):
                prompt_tokens = event.tokens
                splitter = ThinkSplitter(start_in_thinking=event.starts_in_thinking)
            elif isinstance(event, Piece):
                assert splitter is not None
                unreported += event.tokens
                logprobs += event.logprobs
                for kind, text in splitter.feed(event.text):
                    yield Chunk(kind=kind, text=text, tokens=unreported, logprobs=logprobs)
                    reported += unreported
                    unreported, logprobs = 0, ()
            elif isinstance(event, Done):
                if splitter is not None:
                    for kind, text in splitter.flush():
                        yield Chunk(kind=kind, text=text, tokens=unreported, logprobs=logprobs)
                        reported += unreported
                        unreported, logprobs = 0, ()
                # The rest: tokens without text (end of sequence, a stop string).
                yield Chunk(
                    kind="text",
                    text="",
                    tokens=event.tokens - reported,
                    finish_reason=event.finish_reason,
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=event.tokens),
                    logprobs=logprobs,
                )
                return
            elif isinstance(event, ChatfleetError):
                raise event
            else:
                raise EngineError(
                    f"model {self.name!r} failed while generating:"
                    f" {type(event).__name__}: {first_line(event)}"
                ) from event

    # -- worker thread -----------------------------------------------------------

    def _generate(self, request: GenerationRequest, job: Job) -> None:
        """Runs in a generation thread; reports through ``job`` only (never raises)."""
        try:
            tokenizer, model = self._tokenizer, self._model
            if model is None:
                raise EngineUnavailable(f"model {self.name!r} was closed")
            inputs, starts_in_thinking = self._encode(tokenizer, request)
            prompt_ids = inputs["input_ids"]
            prompt_tokens = int(prompt_ids.shape[1])
            max_new_tokens = max(1, request.max_tokens)
            if self._context_length is not None:
                room = self._context_length - prompt_tokens
                if room < 1:
                    raise PayloadTooLarge(
                        f"the prompt has {prompt_tokens} tokens; model {self.name!r}"
                        f" takes at most {self._context_length} including the answer"
                    )
                max_new_tokens = min(max_new_tokens, room)
            job.emit(Prompt(prompt_tokens, starts_in_thinking))

            recorder = None if request.logprobs is None else LogprobRecorder(request.logprobs)
            streamer = PieceStreamer(
                tokenizer,
                job,
                context=prompt_ids[0, -_DETOKENIZE_CONTEXT:].tolist(),
                eos_ids=self._eos_ids,
                stop_strings=request.stop,
                logprobs=recorder,
            )
            # Ours, in this order (generate would run its own before them): the raw
            # logits are recorded before the penalty changes them.
            logits_processor = LogitsProcessorList([] if recorder is None else [recorder])
            penalty = request.sampling.get("repetition_penalty", self.settings.repetition_penalty)
            if penalty != 1.0:
                logits_processor.append(RepetitionPenaltyLogitsProcessor(penalty))
            if request.temperature > 0:
                logits_processor.append(
                    Sampler(request.temperature, request.top_p, request.seed, self._device)
                )
            generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=max_new_tokens,
                do_sample=False,  # Sampler draws from its own seeded generator
                eos_token_id=sorted(self._eos_ids) or None,
                pad_token_id=self._pad_id,
            )
            started = time.monotonic()
            with torch.inference_mode():
                model.generate(
                    **inputs,
                    generation_config=generation_config,
                    logits_processor=logits_processor,
                    stopping_criteria=StoppingCriteriaList([StopWhenSet(job.stop)]),
                    streamer=streamer,
                    # Only what we set: a model's sampling defaults must not sneak in.
                    use_model_defaults=False,
                )
            streamer.flush()
            elapsed = time.monotonic() - started
            logger.debug(
                "%s: %d prompt + %d new tokens in %.2f s (%.1f tokens/s)",
                self.name,
                prompt_tokens,
                streamer.generated,
                elapsed,
                streamer.generated / elapsed if elapsed > 0 else 0.0,
            )
            finish: FinishReason = "stop"
            if (
                not streamer.hit_stop
                and not streamer.hit_eos
                and streamer.generated >= max_new_tokens
            ):
                finish = "length"
            job.emit(Done(finish, streamer.generated))
        except BaseException as exc:
            if not isinstance(exc, ChatfleetError):
                logger.exception("%s: generation failed", self.name)
            job.emit(exc)

    def _encode(self, tokenizer: Any, request: GenerationRequest) -> tuple[Any, bool]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            prompt: str = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError as exc:
            # Templates reject conversations they cannot express ("roles must
            # alternate user/assistant", no system role...): the client's to fix.
            raise RequestError(
                f"model {self.name!r} does not accept this conversation: {first_line(exc)}",
                param="messages",
            ) from exc
        # The template writes the special tokens itself.
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        # Templates of reasoning models may open the think block for the model.
        starts_in_thinking = prompt.rstrip().endswith(OPEN_TAG)
        return inputs.to(self._device), starts_in_thinking

    # -- loading -----------------------------------------------------------------

    def _load(self) -> None:
        s = self.settings
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable(f"model {self.name!r} asks for device cuda; no GPU is visible")
        dtype = {
            "auto": torch.float32 if device == "cpu" else torch.bfloat16,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[s.dtype]
        if s.model is None:
            from chatfleet.serving.embedded import ensure_embedded_model

            source: str | Path = ensure_embedded_model()
        else:
            source = s.model
        started = time.monotonic()
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
                source, trust_remote_code=s.trust_remote_code
            )
            model: Any = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=s.trust_remote_code
            )
        except Exception as exc:
            logger.exception("%s: loading %s failed", self.name, source)
            raise EngineUnavailable(
                f"model {self.name!r} could not load {source}: {first_line(exc)}"
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise EngineUnavailable(
                f"model {self.name!r}: {source} has no chat template (not a chat model?)"
            )
        model.to(device)
        model.eval()

        # End on the model's end-of-sequence tokens and on the tokenizer's (the end
        # of a chat turn, for some models only the latter).
        eos = model.generation_config.eos_token_id
        eos_ids = frozenset(
            [*([eos] if isinstance(eos, int) else (eos or [])), tokenizer.eos_token_id]
        ) - {None}
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id
        if pad is None and eos_ids:
            pad = min(eos_ids)
        self._context_length = getattr(model.config, "max_position_embeddings", None)
        self._eos_ids, self._pad_id = eos_ids, pad
        self._device = device
        self._tokenizer, self._model = tokenizer, model
        logger.info(
            "%s: loaded %s on %s (%s) in %.1f s",
            self.name,
            source,
            device,
            str(dtype).removeprefix("torch."),
            time.monotonic() - started,
        )
