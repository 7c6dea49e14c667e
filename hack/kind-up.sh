#!/usr/bin/env bash
# The kind walk-through in one command: cluster, KubeRay, images, chart, CPU sample,
# wait for Ready, port-forward. Needs docker, kind, kubectl and helm on the PATH.
#
#   hack/kind-up.sh            # do it
#   DRY_RUN=1 hack/kind-up.sh  # print the commands instead of running them
#
# Environment: CLUSTER (chatfleet), NAMESPACE (chatfleet-system), KUBERAY_VERSION
# (hack/versions.env's, the KubeRay the cluster tests run), TAG (dev), PORT (8000),
# SAMPLE (the CPU sample), WAIT (20m).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-chatfleet}"
NAMESPACE="${NAMESPACE:-chatfleet-system}"
# shellcheck source=versions.env
KUBERAY_VERSION="${KUBERAY_VERSION:-$(. "${ROOT}/hack/versions.env" && echo "${KUBERAY_VERSION#v}")}"
TAG="${TAG:-dev}"
PORT="${PORT:-8000}"
SAMPLE="${SAMPLE:-${ROOT}/manifests/samples/chatfleet.dev_v1alpha1_chatdeployment.yaml}"
WAIT="${WAIT:-20m}"
OPERATOR_IMAGE="chatfleet/chatfleet-operator:${TAG}"
SERVING_IMAGE="chatfleet/chatfleet-serving:${TAG}"

run() {
    if [[ -n "${DRY_RUN:-}" ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

need() {
    [[ -n "${DRY_RUN:-}" ]] && return 0
    command -v "$1" >/dev/null || { echo "kind-up: $1 is required" >&2; exit 1; }
}

for tool in docker kind kubectl helm; do need "$tool"; done

# 1. The cluster (kept if it exists).
if [[ -n "${DRY_RUN:-}" ]] || ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
    run kind create cluster --name "${CLUSTER}" --config "${ROOT}/kind-config.yaml" --wait 5m
fi
run kubectl config use-context "kind-${CLUSTER}"

# 2. KubeRay, which runs the RayServices the operator writes.
run helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
run helm upgrade --install kuberay-operator kuberay/kuberay-operator \
    --version "${KUBERAY_VERSION}" --namespace kuberay-system --create-namespace --wait

# 3. Images, built here and loaded into the nodes (no registry).
run docker build -f "${ROOT}/operator/Dockerfile" -t "${OPERATOR_IMAGE}" "${ROOT}"
run docker build -f "${ROOT}/serving/Dockerfile" -t "${SERVING_IMAGE}" "${ROOT}"
run kind load docker-image --name "${CLUSTER}" "${OPERATOR_IMAGE}" "${SERVING_IMAGE}"

# 4. The chart (operator, RBAC, CRD).
run helm upgrade --install chatfleet "${ROOT}/charts/chatfleet" \
    --namespace "${NAMESPACE}" --create-namespace \
    --set image.repository=chatfleet/chatfleet-operator --set "image.tag=${TAG}" \
    --set image.pullPolicy=Never --wait

# 5. The CPU sample, using the serving image just loaded.
run kubectl apply -f "${SAMPLE}"
NAME="$(awk '/^  name:/ {print $2; exit}' "${SAMPLE}")"
run kubectl wait "chatdeployment/${NAME}" --for=condition=Ready --timeout="${WAIT}"
run kubectl get chatdeployment "${NAME}"

# 6. The chat API on localhost (Ctrl-C to stop; the cluster stays).
# Every API call needs a token: mint one from the ChatDeployment's signing key (the
# Secret the operator created), with the chatfleet CLI (scripts/serve's .venv has it).
cat <<EOF
chat API: http://localhost:${PORT}
a token:  TOKEN=\$(kubectl get secret ${NAME}-jwt -o jsonpath='{.data.signing-key}' | base64 -d | chatfleet token --signing-key-file -)
try:      curl -H "Authorization: Bearer \$TOKEN" localhost:${PORT}/v1/models
EOF
run kubectl port-forward "svc/${NAME}-chat" "${PORT}:8000"
