"""A small async Kubernetes REST client over ``kubernetes_asyncio``.

Kopf's handlers are coroutines on its event loop (as Kopf recommends): the API calls
they make must not block that loop, so they go through the asyncio port of the
official client. The operator touches a handful of kinds with four verbs, all the
same shape, so it speaks REST through `kubernetes_asyncio.client.ApiClient` (auth,
TLS, kubeconfig and in-cluster config) instead of one generated API class per kind. Writes of owned
objects are server-side applies (``fieldManager=chatfleet-operator``, forced):
fields the operator stopped setting are removed, fields others set are kept.

Errors: 404 → ``None``/``False`` where absence is an answer; everything else
raises `KubeError` with the status code, which the handlers classify (409 and
5xx are retried by Kopf with backoff).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import kubernetes_asyncio

FIELD_MANAGER = "chatfleet-operator"

# (apiVersion, kind) -> plural, for the kinds the operator reads or writes.
_PLURALS = {
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("ray.io/v1", "RayService"): "rayservices",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("chatfleet.dev/v1alpha1", "ChatDeployment"): "chatdeployments",
}


class KubeError(Exception):
    """A Kubernetes API call failed with an unexpected status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _collection(api_version: str, kind: str, namespace: str) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{quote(namespace)}/{_PLURALS[(api_version, kind)]}"


async def load_api_client(kubeconfig: str | None = None) -> kubernetes_asyncio.client.ApiClient:
    """An API client from the in-cluster service account, else from a kubeconfig file
    (``kubeconfig``, else ``$KUBECONFIG`` as it is now, else ``~/.kube/config``).

    Call it on the event loop that will use the client (its HTTP session lives there).
    """
    configuration = kubernetes_asyncio.client.Configuration()
    try:
        kubernetes_asyncio.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes_asyncio.config.ConfigException:
        await kubernetes_asyncio.config.load_kube_config(
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
        )
    return kubernetes_asyncio.client.ApiClient(configuration)


class Kube:
    """The operator's view of the API server: get, create, apply, delete, patch status."""

    def __init__(
        self, api_client: kubernetes_asyncio.client.ApiClient, timeout_s: float = 30.0
    ) -> None:
        self._api = api_client
        self._timeout = timeout_s

    async def close(self) -> None:
        await self._api.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        # Unread (``_preload_content=False``): every status comes back as a response,
        # to be answered here, instead of some of them as exceptions.
        response = await self._api.call_api(
            path,
            method,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=self._timeout,
        )
        async with response:
            raw = await response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        return int(response.status), data

    @staticmethod
    def _check(status: int, data: Any, *ok: int) -> Any:
        if status in ok or 200 <= status < 300:
            return data
        message = data.get("message", "") if isinstance(data, dict) else str(data)
        raise KubeError(status, message)

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        path = f"{_collection(api_version, kind, namespace)}/{quote(name)}"
        status, data = await self._call("GET", path)
        if status == 404:
            return None
        return self._check(status, data)  # type: ignore[no-any-return]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create ``obj``; ``None`` when it exists already (409)."""
        meta = obj["metadata"]
        path = _collection(obj["apiVersion"], obj["kind"], meta["namespace"])
        status, data = await self._call(
            "POST", path, body=obj, query=[("fieldManager", FIELD_MANAGER)]
        )
        if status == 409:
            return None
        return self._check(status, data)  # type: ignore[no-any-return]

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (creates it when absent)."""
        meta = obj["metadata"]
        collection = _collection(obj["apiVersion"], obj["kind"], meta["namespace"])
        path = f"{collection}/{quote(meta['name'])}"
        status, data = await self._call(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        )
        return self._check(status, data)  # type: ignore[no-any-return]

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete an object (background propagation); ``False`` when it was not there."""
        path = f"{_collection(api_version, kind, namespace)}/{quote(name)}"
        status, data = await self._call(
            "DELETE",
            path,
            body={"propagationPolicy": "Background"},
            content_type="application/json",
        )
        if status == 404:
            return False
        self._check(status, data)
        return True

    async def patch_status(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; ``None`` when the object is gone.

        With ``resource_version``, only if the object is still at that version (the
        API server answers 409, a `KubeError`, when someone wrote it since).
        """
        path = f"{_collection(api_version, kind, namespace)}/{quote(name)}/status"
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        code, data = await self._call(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )
        if code == 404:
            return None
        return self._check(code, data)  # type: ignore[no-any-return]

    async def serves(self, group_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``group_version`` (a CRD is installed)."""
        code, data = await self._call("GET", f"/apis/{group_version}")
        if code == 404:
            return False
        data = self._check(code, data)
        return any(r.get("name") == plural for r in (data or {}).get("resources", []))
