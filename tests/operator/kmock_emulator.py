"""kmock's Kubernetes emulator, extended with what the operator relies on.

kmock 0.8 stores objects and streams watch events, but it never stamps
``metadata.uid``, ``resourceVersion``, ``generation`` or ``creationTimestamp``,
treats every PATCH/PUT as a JSON merge, and has no garbage collector. This
subclass adds, as a real API server would:

- identity stamps on create, ``resourceVersion`` bumps on every write and
  ``generation`` bumps when ``spec`` changes;
- the status subresource: ``.../status`` writes change only ``status``, main
  writes never change it;
- JSON patches (``application/json-patch+json``, with ``test`` ops → 422, as
  Kopf uses for finalizers), RFC 7386 merge patches, PUT replaces, and
  server-side apply (``application/apply-patch+yaml``: creates when absent);
- garbage collection of dependents through ``ownerReferences`` when an owner
  is finally removed;
- no request history (kmock matches each request against all earlier ones);
- the namespace collection (``/api/v1/namespaces``), which kmock's parser misreads.

Used by the Kopf integration tests and by ``bench/operator.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, rendering

_counter = itertools.count(1000)
_last = [999]


def _next_version() -> str:
    _last[0] = next(_counter)
    return str(_last[0])


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _diff(old: Any, new: Any) -> Any:
    """The merge patch turning ``old`` into ``new`` (kmock applies updates as merges)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    out: dict[str, Any] = {}
    for key in old:
        if key not in new:
            out[key] = None
    for key, value in new.items():
        if key not in old:
            out[key] = copy.deepcopy(value)
        elif old[key] != value:
            out[key] = _diff(old[key], value)
    return out


def _rewrite(request: rendering.Request, **fields: Any) -> None:
    # kmock finds a request's reactions by the request object's identity, so the
    # (frozen) request is changed in place rather than replaced.
    for name, value in fields.items():
        object.__setattr__(request, name, value)


def _rbac_of(request: rendering.Request) -> tuple[str, str, str]:
    assert request.resource is not None
    method = str(request.method.value if hasattr(request.method, "value") else request.method)
    if method == "GET":
        if request.params.get("watch") == "true":
            verb = "watch"
        else:
            verb = "get" if request.name else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    resource = request.resource.plural or ""
    if request.subresource:
        resource += f"/{request.subresource}"
    return verb, request.resource.group or "", resource


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class StampingEmulator(kmock.KubernetesEmulator):
    """A `kmock.KubernetesEmulator` that behaves enough like an API server for Kopf."""

    # (verb, API group, resource[/subresource]) of every resource request, as RBAC
    # would check it: what the operator needs to be granted.
    audit: set[tuple[str, str, str]] = attrs.field(factory=set)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's URL parser fails on the namespace collection itself (it reads
        # "namespaces" as a namespace name); Kopf lists and watches it when it serves
        # named namespaces. Serve it from the namespaces the stored objects live in.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        names = sorted({ns for (_r, ns, _n), obj in self.objects.items() if ns and not obj.deleted})
        items = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "uid": n}}
            for n in names
        ]
        if raw.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {
                    "kind": "NamespaceList",
                    "metadata": {"resourceVersion": str(_last[0])},
                    "items": items,
                }
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw)
        await asyncio.Event().wait()  # no namespace ever changes here; until disconnected
        return response  # pragma: no cover

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        if request.resource.plural:  # not discovery (/apis/group/version)
            self.audit.add(_rbac_of(request))
        if request.action == enums.action.CREATE:
            _rewrite(request, data=self._stamp_new(request.data, request.namespace))
        elif request.action == enums.action.UPDATE and request.name is not None:
            self._rewrite_update(request)
        elif request.action == enums.action.DELETE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                version = _next_version()
                self.objects[key].patch({"metadata": {"resourceVersion": version}})
        target = self._uid_of(request)
        try:
            response = await super()._handle(request)
        finally:
            self._forget(request)
        if target is not None and self._uid_of(request) != target:
            await self._collect_garbage({target})  # the object is gone: its dependents too
        return response

    def _forget(self, request: rendering.Request) -> None:
        # kmock keeps every request for assertions and matches each new one against
        # that whole history: quadratic, minutes for a few thousand requests. The
        # operator tests assert on objects, not requests, so served ones are dropped.
        with contextlib.suppress(ValueError):
            self._requests.remove(request)

    # --- writes ----------------------------------------------------------------------

    def _stamp_new(self, data: Any, namespace: str | None) -> Any:
        if not isinstance(data, dict):
            return data
        data = copy.deepcopy(data)
        meta = data.setdefault("metadata", {})
        meta.setdefault("namespace", namespace) if namespace else None
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = _next_version()
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        for key in ("deletionTimestamp",):
            meta.pop(key, None)
        return data

    def _rewrite_update(self, request: rendering.Request) -> None:
        assert request.resource is not None
        key = (request.resource, request.namespace, request.name)
        exists = key in self.objects and not self.objects[key].deleted
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if not exists:
            if content_type == "application/apply-patch+yaml" and request.subresource is None:
                # Server-side apply creates what does not exist.
                data = self._stamp_new(request.data, request.namespace)
                _rewrite(request, action=enums.action.CREATE, data=data)
            return  # kmock answers 404
        current = copy.deepcopy(self.objects[key].raw)
        patch = request.data
        # A resourceVersion in a patch is a precondition, as on a real API server.
        wanted = ((patch or {}).get("metadata") or {}) if isinstance(patch, dict) else {}
        have = (current.get("metadata") or {}).get("resourceVersion")
        if wanted.get("resourceVersion") not in (None, have):
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )
        if content_type == "application/json-patch+json":
            try:
                desired = jsonpatch.apply_patch(current, patch)
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
        elif content_type == "application/apply-patch+yaml":
            desired = copy.deepcopy(current)
            for field, value in (patch or {}).items():
                if field == "metadata":
                    meta = desired.setdefault("metadata", {})
                    for mkey in ("labels", "annotations"):
                        if mkey in value:
                            meta[mkey] = {**meta.get(mkey, {}), **value[mkey]}
                    if "ownerReferences" in value:
                        meta["ownerReferences"] = value["ownerReferences"]
                elif field != "status":
                    desired[field] = copy.deepcopy(value)
            for field in list(desired):
                if field not in ("apiVersion", "kind", "metadata", "status") and field not in patch:
                    del desired[field]
        elif request.method == enums.method.PUT:
            desired = copy.deepcopy(patch)
            desired.setdefault("metadata", {})
            for mkey in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if mkey in current.get("metadata", {}):
                    desired["metadata"][mkey] = current["metadata"][mkey]
        else:  # merge patch (and strategic merge, approximated)
            desired = _merge(current, patch)

        # The status subresource: each endpoint changes only its own half.
        info = self.resources.get(request.resource) if request.resource in self.resources else None
        has_status = info is None or "status" in (info.subresources or set())
        if not has_status:
            pass  # no status subresource: the main endpoint writes status too
        elif request.subresource == "status":
            desired = {**current, "status": desired.get("status")}
            if desired["status"] is None:
                del desired["status"]
        else:
            if "status" in current:
                desired["status"] = current["status"]
            else:
                desired.pop("status", None)
        desired = copy.deepcopy(desired)  # never alias `current`: we diff against it
        meta = desired.setdefault("metadata", {})
        meta["resourceVersion"] = _next_version()
        if desired.get("spec") != current.get("spec"):
            meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        _rewrite(request, data=_diff(current, desired))

    # --- list and watch ------------------------------------------------------------------

    async def _serve_list(self, request: rendering.Request) -> Any:
        # A real resourceVersion, so a watch can resume from the list without replays.
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(_last[0])
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        # kmock snapshots the objects, streams them, and only then subscribes to the
        # event bus: a change in between is lost. Subscribe first, under the lock.
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else None
        async with self._lock:
            marker = await bus.mark()
            replay = []
            for (resource, namespace, name), obj in self.objects.items():
                if obj.deleted or not self._matches(request, resource, namespace, name):
                    continue
                raw = obj.raw
                version = int(raw.get("metadata", {}).get("resourceVersion") or 0)
                if since_version is None or version > since_version:
                    replay.append(raw)
        try:
            for raw in replay:
                yield {"type": "ADDED" if since_version is None else "MODIFIED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._matches(
                    request, request.resource, meta.get("namespace"), meta.get("name")
                ):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _matches(
        request: rendering.Request, resource: Any, namespace: str | None, name: str | None
    ) -> bool:
        return bool(
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    # --- garbage collection ----------------------------------------------------------

    def _uid_of(self, request: rendering.Request) -> str | None:
        """The uid of the live object a DELETE or PATCH targets, if any."""
        if request.action not in (enums.action.DELETE, enums.action.UPDATE) or not request.name:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].last.raw.get("metadata", {}).get("uid")  # type: ignore[no-any-return]

    async def _collect_garbage(self, gone: set[str]) -> None:
        while gone:
            removed: set[str] = set()
            async with self._lock:
                for (resource, _ns, _name), obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    owners = {
                        r.get("uid") for r in obj.get("metadata", {}).get("ownerReferences", [])
                    }
                    if owners & gone:
                        raw = obj.raw
                        removed.add(raw.get("metadata", {}).get("uid"))
                        obj.delete()
                        await self._buses[resource].put({"type": "DELETED", "object": raw})
            gone = removed - {None}
