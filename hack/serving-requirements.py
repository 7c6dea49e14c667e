#!/usr/bin/env python3
"""Print the installed chatfleet distribution's requirements for some extras, one a line.

Used by serving/Dockerfile's GPU variant: vLLM brings its own CUDA torch and
transformers 5, which clash with the serving extra's pins, so that image installs
chatfleet with --no-deps and then everything else the serving extra needs:

    python hack/serving-requirements.py --extra serving --without torch transformers
"""

from __future__ import annotations

import argparse
import importlib.metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements(extras: list[str], without: list[str]) -> list[str]:
    skip = {canonicalize_name(name) for name in without}
    out = []
    for line in importlib.metadata.requires("chatfleet") or []:
        req = Requirement(line)
        if canonicalize_name(req.name) in skip:
            continue
        if req.marker is not None:
            if not any(req.marker.evaluate({"extra": extra}) for extra in extras):
                continue
            req.marker = None
        out.append(str(req))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="extra to include")
    parser.add_argument("--without", nargs="*", default=[], help="distributions to leave out")
    args = parser.parse_args()
    print("\n".join(requirements(args.extra, args.without)))


if __name__ == "__main__":
    main()
