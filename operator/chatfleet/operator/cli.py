"""``chatfleet-operator``: run the operator, or write the CRD.

    chatfleet-operator crd [--output PATH|-]   write the ChatDeployment CRD YAML
    chatfleet-operator run [kopf run options]  run the operator (Kopf)

Settings come from ``CHATFLEET_OPERATOR_*`` variables (`OperatorSettings`).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

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


def _run(args: argparse.Namespace) -> int:
    import kopf

    from chatfleet.operator._operator import build_registry
    from chatfleet.operator._settings import OperatorSettings

    settings = OperatorSettings()
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
        liveness_endpoint=args.liveness or None,
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
        default="http://0.0.0.0:8081/healthz",
        help="Kopf's liveness endpoint URL; empty disables it",
    )
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
