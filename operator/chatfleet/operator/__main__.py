"""``python -m chatfleet.operator`` runs the operator (same as ``chatfleet-operator run``)."""

from __future__ import annotations

import sys

from chatfleet.operator.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["run"]))
