"""``chatfleet-operator``: run the operator, or write the CRD.

    chatfleet-operator crd [--output PATH|-]   write the ChatDeployment CRD YAML
    chatfleet-operator run [kopf run options]  run the operator (Kopf)

Settings come from ``CHATFLEET_OPERATOR_*`` variables (`OperatorSettings`).

``run`` checks what Kopf would otherwise retry forever (a traceback a minute):
the Kopf extra is installed, a cluster is configured (in a pod or a kubeconfig)
and its API server answers. Each failure is one line and a non-zero exit.

Outside a pod, the liveness and metrics endpoints listen on 127.0.0.1 unless
told otherwise: a laptop's operator need not be reachable from its network. In
a pod (``KUBERNETES_SERVICE_HOST`` is set) they listen on every interface, for
the kubelet's probes and Prometheus (the chart passes ``--liveness`` explicitly).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatfleet.operator import _OPERATOR_EXTRA
from chatfleet.operator._settings import ENV_PREFIX, OperatorSettings

LIVENESS_PORT = 8081
_API_TIMEOUT_S = 5.0

CRD_FILE = "chatfleet.dev_chatdeployments.yaml"
# The CRD lives at the repository root and, identical, in the Helm chart.
DEFAULT_CRD_PATHS = (
    Path("crds") / CRD_FILE,
    Path("charts") / "chatfleet" / "files" / "crds" / CRD_FILE,
)


def _crd(args: argparse.Namespace) -> int:
    from chatfleet.operator._crd import render_crd_yaml

    text = render_crd_yaml()
    if args.check:
        stale = [
            str(p) for p in map(Path, args.output or DEFAULT_CRD_PATHS)
            if not p.is_file() or p.read_text() != text
        ]  # fmt: skip
        for name in stale:
            print(f"stale: {name} (run `chatfleet-operator crd`)", file=sys.stderr)
        return 1 if stale else 0
    for output in args.output or [str(p) for p in DEFAULT_CRD_PATHS]:
        if output == "-":
            sys.stdout.write(text)
            continue
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}", file=sys.stderr)
    return 0


class OperatorStartError(Exception):
    """A reason ``run`` cannot start, and what to do about it."""


def in_cluster(environ: Mapping[str, str]) -> bool:
    """Whether this process runs in a Kubernetes pod."""
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


def bind_defaults(
    settings: OperatorSettings, liveness: str | None, environ: Mapping[str, str]
) -> tuple[OperatorSettings, str]:
    """The settings and liveness URL with the addresses nobody chose filled in.

    Every interface in a pod (probes and scrapes come from outside the container),
    127.0.0.1 elsewhere.
    """
    host = "0.0.0.0" if in_cluster(environ) else "127.0.0.1"
    if f"{ENV_PREFIX}METRICS_HOST" not in environ:
        settings = settings.model_copy(update={"metrics_host": host})
    if liveness is None:
        liveness = f"http://{host}:{LIVENESS_PORT}/healthz"
    return settings, liveness


def check_cluster(kubeconfig: str | None) -> None:
    """Raise `OperatorStartError` unless a cluster is configured and its API server answers."""
    asyncio.run(_check_cluster(kubeconfig))


async def _check_cluster(kubeconfig: str | None) -> None:
    import kubernetes_asyncio

    from chatfleet.operator._kube import load_api_client

    try:
        client = await load_api_client(kubeconfig)
    except (kubernetes_asyncio.config.ConfigException, OSError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise OperatorStartError(
            f"no Kubernetes cluster configured: not in a pod, and no usable kubeconfig"
            f" at {where} ({exc})\n  point KUBECONFIG (or CHATFLEET_OPERATOR_KUBECONFIG)"
            " at a cluster's kubeconfig"
        ) from exc
    host = client.configuration.host
    try:
        async with client:
            await kubernetes_asyncio.client.VersionApi(client).get_code(
                _request_timeout=_API_TIMEOUT_S
            )
    except kubernetes_asyncio.client.ApiException as exc:
        if exc.status == 401:
            raise OperatorStartError(
                f"the Kubernetes API server at {host} refused the credentials (401)\n"
                "  renew them (kubectl get --raw /version should work) or fix the kubeconfig"
            ) from exc
        # Any other answer (403, 404 from an emulator) means the server is there.
    except Exception as exc:  # aiohttp connection errors, timeouts, TLS failures
        reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()
        raise OperatorStartError(
            f"cannot reach the Kubernetes API server at {host}"
            f" ({type(exc).__name__}: {reason[0][:200] if reason else ''})\n"
            "  start the cluster or select a running one (kubectl config use-context)"
        ) from exc


def _kopf() -> Any:
    """Kopf, once it and the Kubernetes client are known to be installed."""
    try:
        import kopf
        import kubernetes_asyncio  # noqa: F401 - check_cluster and the reconciler need it
    except ModuleNotFoundError as exc:
        raise OperatorStartError(
            f"the operator needs {exc.name or 'kopf'}, part of the operator extra:"
            f" {_OPERATOR_EXTRA}"
        ) from exc
    return kopf


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        kopf = _kopf()
        from chatfleet.operator._operator import build_registry

        settings = OperatorSettings()
    except OperatorStartError as exc:
        print(f"chatfleet-operator: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"chatfleet-operator: invalid CHATFLEET_OPERATOR_* settings:\n{exc}", file=sys.stderr)
        return 2
    settings, liveness = bind_defaults(settings, args.liveness, os.environ)
    if settings.kubeconfig and not os.environ.get("KUBECONFIG"):
        # Kopf logs in on its own, from $KUBECONFIG: the same file as our client.
        os.environ["KUBECONFIG"] = settings.kubeconfig
    try:
        check_cluster(settings.kubeconfig)
    except OperatorStartError as exc:
        print(f"chatfleet-operator: {exc}", file=sys.stderr)
        return 1
    registry = build_registry(settings)
    kopf.configure(verbose=args.verbose)
    priority = None
    if settings.peering is not None:
        # Kopf pauses every replica when peers share a priority: make them distinct.
        priority = settings.priority
        if priority is None:
            priority = secrets.randbelow(2**31 - 1) + 1
    kopf.run(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=priority,
        liveness_endpoint=liveness or None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatfleet-operator", description="The chatfleet Kubernetes operator."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    crd = sub.add_parser("crd", help="write the ChatDeployment CRD (generated from the models)")
    crd.add_argument(
        "--output",
        "-o",
        action="append",
        help="file to write, or - for stdout; repeatable"
        f" (default: {' and '.join(map(str, DEFAULT_CRD_PATHS))})",
    )
    crd.add_argument(
        "--check", action="store_true", help="only check the files are current (exit 1 if not)"
    )
    crd.set_defaults(func=_crd)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    run.add_argument(
        "--liveness",
        default=None,
        help="Kopf's liveness endpoint URL; empty disables it (default: port"
        f" {LIVENESS_PORT} on every interface in a pod, on 127.0.0.1 elsewhere)",
    )
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
