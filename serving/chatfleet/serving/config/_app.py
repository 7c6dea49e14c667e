"""`AppConfig`, the whole application, and `load_config`, which builds one from a
file and ``CHATFLEET_`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from chatfleet.serving.config._auth import AuthConfig
from chatfleet.serving.config._base import _Model
from chatfleet.serving.config._engines import FakeEngineConfig, GenerationDefaults, ModelConfig
from chatfleet.serving.config._routing import (
    ClassifierConfig,
    CompressorConfig,
    RouteConfig,
    RoutingConfig,
)
from chatfleet.serving.config._server import (
    CoalesceConfig,
    IngressDeploymentConfig,
    ServerConfig,
    WebSocketConfig,
)
from chatfleet.serving.config._store import StoreConfig
from chatfleet.serving.config._telemetry import TelemetryConfig

ENV_PREFIX = "CHATFLEET_"


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


#: Categories the fake profile sends to its reasoning simulator: the ones where a
#: visible chain of thought is what a user would expect from a bigger model.
_REASONING_CATEGORIES = frozenset({"coding", "maths"})


def _fake_models() -> list[ModelConfig]:
    return [
        ModelConfig(name="fake", engine="fake", description="Deterministic simulator"),
        ModelConfig(
            name="fake-reasoner",
            engine="fake",
            description="Deterministic simulator that thinks before it answers",
            fake=FakeEngineConfig(thinking_tokens=24, seed=1),
        ),
    ]


def embedded_pipeline(engine: Literal["fake", "transformers"]) -> dict[str, Any]:
    """The models, classifier, routes and compressor of the embedded default.

    Everything loads offline from PyPI packages: all-MiniLM-L6-v2 classifies,
    the original LLMLingua method compresses with SmolLM2 (LLMLingua-2's model
    exists only on the hub). On ``transformers`` the one SmolLM2 model answers
    every category, so ``auto`` still reports the category; ``fake`` has two
    simulators so that ``auto`` visibly chooses: coding and maths go to
    ``fake-reasoner`` (thinking first, falling back to ``fake``), the rest to ``fake``.
    """
    classifier = ClassifierConfig()
    if engine == "fake":
        models = _fake_models()
        routes = [
            RouteConfig(category=c.name, model="fake-reasoner", fallbacks=["fake"])
            if c.name in _REASONING_CATEGORIES
            else RouteConfig(category=c.name, model="fake")
            for c in classifier.categories
        ]
    else:
        models = _default_models()
        routes = [RouteConfig(category=c.name, model=models[0].name) for c in classifier.categories]
    return {
        "models": models,
        "default_model": models[0].name,
        "classifier": classifier,
        "routing": RoutingConfig(routes=routes),
        "compressor": CompressorConfig(method="llmlingua"),
    }


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
        for m in self.models:  # a loop, not next(genexpr): asked several times a request
            if m.name == name:
                return m
        return None

    def is_bare_default(self) -> bool:
        """Whether models and routing are still the schema's defaults (nothing chosen)."""
        return (
            self.models == _default_models()
            and self.default_model is None
            and self.classifier is None
            and self.compressor is None
            and self.routing is None
        )

    def with_embedded_pipeline(self, engine: Literal["fake", "transformers"]) -> AppConfig:
        """This config with the embedded default's models, classifier, routes and compressor.

        Server, store, auth and the rest stay as they are.
        """
        return AppConfig.model_validate({**self.model_dump(), **embedded_pipeline(engine)})

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
