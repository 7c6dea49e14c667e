"""A stage probe for bench/serve_stages.py: in Ray worker processes only (with
CHATFLEET_STAGE_TRACE_DIR set), wrap Ray Serve 2.60's handle-call path and chatfleet's
token relay, and write one line per stage and request to ``<dir>/<pid>.tsv``:
``stage, id, time.monotonic(), extra`` (CLOCK_MONOTONIC: comparable across processes).

Python loads ``sitecustomize`` at startup from the path, so the probe reaches every
worker Ray starts without touching the shared virtualenv. Everything is module-level:
cloudpickle pickles a module's functions by reference, and the replaced methods travel
with the classes Serve pickles.

Stages, by Serve's ``internal_request_id`` (ingress = I, engine replica = E):
A0 (I) the router's ``assign_request`` starts; A3 (I) ``RunningReplica.try_send_request``
opens the gRPC call; R0 (E) the gRPC servicer ``HandleRequestWithRejectionStreaming``
starts; R1 (E) ``handle_request_with_rejection`` (arguments unpickled); R2 (E) it
accepts (the answer goes back as initial metadata); R3 (E) the user generator starts;
A4 (I) the router has the answer; A9 (I) ``assign_request`` returns; E1 (E) the first
item for the request goes on the relay link; Q1 (I) it is in the relay's stream
queue; B1 (I) the ingress reads it out of ``Relay.receive``. The request sent ahead on
the link: O (I) ``Relay.offer`` writes it; C (E) the engine replica starts it; S (E) its
generation task runs (by relay key, like E1). H (I) the ingress's ASGI app got the
HTTP request (Starlette's ``__call__``); W0 (I) the response's first body bytes go
to the server (uvicorn), W its first with a ``"content"``. HX and WX are H and W again,
by the client's ``X-Request-ID`` and on the wall clock (``time.time()``), to set
against the client's own record of the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import sys
import time

_out = None
_orig: dict = {}
_servicer_entry = contextvars.ContextVar("stage_servicer_entry", default=None)
_sent: set = set()


def rec(stage, rid, extra="", at=None):
    global _out
    if _out is None:
        folder = os.environ["CHATFLEET_STAGE_TRACE_DIR"]
        os.makedirs(folder, exist_ok=True)
        _out = open(os.path.join(folder, f"{os.getpid()}.tsv"), "a", buffering=1)  # noqa: SIM115
    _out.write(f"{stage}\t{rid}\t{time.monotonic() if at is None else at:.6f}\t{extra}\n")


async def assign_request(self, request_meta, *args, **kwargs):
    rid = request_meta.internal_request_id
    extra = ""
    if self._request_router_initialized.is_set():
        router = self._active_request_router
        extra = f"pending={router.num_pending_requests},tasks={router.curr_num_routing_tasks}"
    rec("A0", rid, extra)
    try:
        return await _orig["assign_request"](self, request_meta, *args, **kwargs)
    finally:
        rec("A9", rid)


def try_send_request(self, pr, with_rejection):
    rec("A3", pr.metadata.internal_request_id)
    return _orig["try_send_request"](self, pr, with_rejection)


async def get_rejection_response(self, *args, **kwargs):
    answer = await _orig["get_rejection_response"](self, *args, **kwargs)
    rec("A4", self._metadata.internal_request_id)
    return answer


async def servicer(self, request, context):
    _servicer_entry.set(time.monotonic())
    async for item in _orig["servicer"](self, request, context):
        yield item


async def handle_request_with_rejection(self, request_metadata, *args, **kwargs):
    rid = request_metadata.internal_request_id
    if (entry := _servicer_entry.get()) is not None:
        rec("R0", rid, at=entry)
    rec("R1", rid, f"ongoing={self.get_num_ongoing_requests()}")
    first = True
    async for item in _orig["hrr"](self, request_metadata, *args, **kwargs):
        if first:
            rec("R2", rid)
            first = False
        yield item


async def call_user_generator(self, request_metadata, *args, **kwargs):
    rec("R3", request_metadata.internal_request_id)
    async for item in _orig["cug"](self, request_metadata, *args, **kwargs):
        yield item


def link_send(self, stream_id, item):
    if stream_id not in _sent:
        _sent.add(stream_id)
        rec("E1", stream_id)
    return _orig["link_send"](self, stream_id, item)


def relay_offer(self, replica, stream_id, request):
    rec("O", stream_id)
    return _orig["relay_offer"](self, replica, stream_id, request)


def early_start(self, stream_id, run):
    rec("C", stream_id)

    async def traced():
        rec("S", stream_id)
        return await run()

    return _orig["early_start"](self, stream_id, traced)


_http_start = contextvars.ContextVar("stage_http_start", default=None)


_http_request = contextvars.ContextVar("stage_http_request", default=None)
_TEXT = re.compile(rb'"content": ?"[^"]')  # a chunk with text in it (not the role's "")


async def starlette_call(self, scope, receive, send):
    if scope["type"] != "http":
        return await _orig["starlette_call"](self, scope, receive, send)
    _http_start.set(time.monotonic())
    request = {}  # the request's id once it has one (relay_receive)
    _http_request.set(request)
    # The client's own id (aiperf sends X-Request-ID), on the wall clock aiperf stamps
    # its requests with: where the client's time to first token goes, before the app
    # and after it.
    client_id = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode()
    if client_id:
        rec("HX", client_id, at=time.time())

    async def traced_send(message):
        if message["type"] == "http.response.start" and "rid" in request:
            rec("X0", request["rid"])
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if "rid" in request:
                if "W0" not in request:
                    request["W0"] = True
                    rec("W0", request["rid"])
                if "W" not in request and b'"content"' in body:
                    request["W"] = True
                    rec("W", request["rid"])
            # The first text (what aiperf counts), also from an app without the relay.
            if client_id and "WX" not in request and _TEXT.search(body):
                request["WX"] = True
                rec("WX", client_id, at=time.time())
        return await send(message)

    return await _orig["starlette_call"](self, scope, receive, traced_send)


async def event_stream_call(self, scope, receive, send):
    if (request := _http_request.get()) is not None and "rid" in request:
        rec("X1", request["rid"])
    return await _orig["event_stream_call"](self, scope, receive, send)


class _FirstRelayItem(asyncio.Queue):
    rid = ""
    seen = False

    def put_nowait(self, item):
        if not self.seen and item[0] == "relay":
            self.seen = True
            rec("Q1", self.rid)
        return super().put_nowait(item)


def relay_receive(self, stream_id, handle_stream):
    rid = handle_stream._request_metadata.internal_request_id
    rec("K", rid, stream_id)  # the relay key of the request (E1 is by key)
    if (start := _http_start.get()) is not None:
        rec("H", rid, at=start)
    if (request := _http_request.get()) is not None:
        request["rid"] = rid
    batches = _orig["relay_receive"](self, stream_id, handle_stream)
    if (stream := self._streams.get(stream_id)) is not None:
        stream.queue = _FirstRelayItem()
        stream.queue.rid = rid

    async def first_read():
        first = True
        try:
            async for batch in batches:
                if first:
                    rec("B1", rid)
                    first = False
                yield batch
        finally:
            await batches.aclose()

    return first_read()


def _patch(cls, name, key, new):
    _orig[key] = getattr(cls, name)
    new.__name__ = name
    new.__qualname__ = f"{cls.__name__}.{name}"
    setattr(cls, name, new)


def _install():
    import starlette.applications
    from ray.serve._private import replica, replica_result, router
    from ray.serve._private.request_router import replica_wrapper

    from chatfleet.serving import relay, relay_links
    from chatfleet.serving.api import _streaming
    from chatfleet.serving.app import _early

    _patch(router.AsyncioRouter, "assign_request", "assign_request", assign_request)
    _patch(replica_wrapper.RunningReplica, "try_send_request", "try_send_request", try_send_request)
    _patch(
        replica_result.gRPCReplicaResult,
        "get_rejection_response",
        "get_rejection_response",
        get_rejection_response,
    )
    _patch(replica.Replica, "HandleRequestWithRejectionStreaming", "servicer", servicer)
    _patch(replica.Replica, "handle_request_with_rejection", "hrr", handle_request_with_rejection)
    _patch(replica.UserCallableWrapper, "call_user_generator", "cug", call_user_generator)
    _patch(relay_links._Link, "send", "link_send", link_send)
    _patch(relay.Relay, "receive", "relay_receive", relay_receive)
    _patch(relay.Relay, "offer", "relay_offer", relay_offer)
    # The engine deployment's class travels by value (pickled by the driver): the probe
    # wraps EarlyStarts, which its copy imports by reference.
    _patch(_early.EarlyStarts, "start", "early_start", early_start)
    _patch(starlette.applications.Starlette, "__call__", "starlette_call", starlette_call)
    _patch(_streaming.EventStream, "__call__", "event_stream_call", event_stream_call)


if os.environ.get("CHATFLEET_STAGE_TRACE_DIR") and any("default_worker" in a for a in sys.argv[:2]):
    try:
        _install()
    except Exception as exc:  # Ray moved: the bench says so, the worker still runs
        sys.stderr.write(f"serve_stages probe not installed: {exc!r}\n")
