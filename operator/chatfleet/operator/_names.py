"""What the operator names and labels the objects it creates, and the constants they share."""

from __future__ import annotations

from typing import Any

from chatfleet.operator._models import ChatDeploymentSpec

IMPORT_PATH = "chatfleet.serving.app:build_app"
APPLICATION_NAME = "chatfleet"  # = chatfleet.serving.app.APP_NAME (no Ray import here)
RAY_METRICS_PORT = 8080
OLLAMA_PORT = 11434
JWT_SECRET_KEY = "signing-key"
# The variable the database URL goes in when spec.serving.store.url_env names none
# (the JWT key's variable is spec.serving.auth.signing_key_env).
DEFAULT_DATABASE_URL_ENV = "CHATFLEET_DATABASE_URL"

OWNER_LABEL = "chatfleet.dev/chatdeployment"
MANAGED_BY = {"app.kubernetes.io/managed-by": "chatfleet-operator"}


def labels_for(name: str) -> dict[str, str]:
    """Labels on everything the operator creates for the ChatDeployment ``name``."""
    return {
        "app.kubernetes.io/name": "chatfleet",
        "app.kubernetes.io/instance": name,
        **MANAGED_BY,
        OWNER_LABEL: name,
    }


def rayservice_name(name: str) -> str:
    return name


def service_name(name: str) -> str:
    return f"{name}-chat"


def jwt_secret_name(name: str) -> str:
    return f"{name}-jwt"


def endpoint_for(name: str, namespace: str, spec: ChatDeploymentSpec) -> str:
    """The in-cluster URL of the chat API (the Service `build_service` renders)."""
    return f"http://{service_name(name)}.{namespace}.svc:{spec.serving.server.port}"


def _meta(name: str, namespace: str, owner: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels_for(owner)}
