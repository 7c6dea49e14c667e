#!/usr/bin/env bash
# End-to-end check of a plane started by hack/control-plane.sh (what tests rely on):
#   hack/control-plane/verify.sh [KUBECONFIG]
# With no argument it runs `up` itself (and `down` at the end). Exits non-zero on the first
# failed check. Every object it makes lives in a throw-away namespace / CRD it deletes.
set -euo pipefail
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CP="$HACK_DIR/control-plane.sh"
eval "$("$CP" env)"   # PATH: the cached kubectl, helm

own_plane=0
if [[ $# -ge 1 ]]; then export KUBECONFIG=$1
else
  KUBECONFIG=$("$CP" up); export KUBECONFIG; own_plane=1
fi
ns=cp-verify-$$
cleanup() {
  kubectl delete ns "$ns" --wait=false >/dev/null 2>&1 || true
  kubectl delete crd widgets.verify.chatfleet.dev --wait=false >/dev/null 2>&1 || true
  if ((own_plane)); then "$CP" down; fi
}
trap cleanup EXIT
ok() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; exit 1; }
# retry <seconds> <command...>: the controllers act asynchronously.
retry() { local n=$1; shift; local end=$((SECONDS + n)); until "$@" >/dev/null 2>&1; do ((SECONDS < end)) || return 1; sleep 0.5; done; }

kubectl version -o json | grep -q '"gitVersion": "v1\.' && ok "kubectl version (server $(kubectl version -o json | sed -n 's/.*"gitVersion": "\(v1[^"]*\)".*/\1/p' | tail -1))"
kubectl get ns default kube-system >/dev/null && ok "kubectl get ns"
kubectl create ns "$ns" >/dev/null && ok "create namespace $ns"

# KubeRay CRDs installed and Established by `up`.
for c in rayclusters rayjobs rayservices; do
  kubectl wait --for=condition=Established --timeout=10s "crd/$c.ray.io" >/dev/null || fail "crd $c"
done
ok "KubeRay CRDs Established"

# A CRD with a CEL rule (x-kubernetes-validations): valid object accepted, invalid rejected.
kubectl apply --server-side -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.verify.chatfleet.dev}
spec:
  group: verify.chatfleet.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: "self.min <= self.max"
              message: "min must not exceed max"
            properties:
              min: {type: integer}
              max: {type: integer}
EOF
kubectl wait --for=condition=Established --timeout=30s crd/widgets.verify.chatfleet.dev >/dev/null
retry 30 kubectl get widgets -n "$ns" || fail "widgets not served"
printf 'apiVersion: verify.chatfleet.dev/v1\nkind: Widget\nmetadata: {name: good}\nspec: {min: 1, max: 2}\n' |
  kubectl apply -n "$ns" -f - >/dev/null || fail "valid Widget rejected"
if out=$(printf 'apiVersion: verify.chatfleet.dev/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {min: 3, max: 2}\n' |
  kubectl apply -n "$ns" -f - 2>&1); then fail "CEL rule did not reject min > max"; fi
[[ $out == *"min must not exceed max"* ]] || fail "unexpected rejection: $out"
ok "CEL validation (x-kubernetes-validations) enforced"

# Garbage collection: owned ConfigMap goes away with its owner.
kubectl create configmap gc-owner -n "$ns" >/dev/null
uid=$(kubectl get configmap gc-owner -n "$ns" -o jsonpath='{.metadata.uid}')
kubectl apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: gc-owned
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: gc-owner, uid: $uid, blockOwnerDeletion: true}
EOF
kubectl delete configmap gc-owner -n "$ns" >/dev/null
retry 60 bash -c "! kubectl get configmap gc-owned -n $ns" || fail "owned ConfigMap not garbage-collected"
ok "garbage collection (owned ConfigMap deleted with its owner)"

# Service accounts / tokens (serviceaccount controller + TokenRequest with our signing key).
retry 30 kubectl get serviceaccount default -n "$ns" || fail "no default ServiceAccount in $ns"
kubectl create token default -n "$ns" >/dev/null || fail "TokenRequest"
ok "ServiceAccount + token"

# Impersonation (system:masters may impersonate; RBAC denies the impersonated user).
answer=$(kubectl auth can-i get pods -n "$ns" --as=system:serviceaccount:"$ns":default 2>/dev/null || true)
[[ $answer == no ]] || fail "impersonated service account should not be allowed to get pods (can-i: $answer)"
out=$(kubectl get pods -n "$ns" --as=system:serviceaccount:"$ns":default 2>&1 || true)
[[ $out == *Forbidden* ]] || fail "expected Forbidden for the impersonated service account: $out"
ok "impersonation (--as) with RBAC applied"

# OwnerReferencesPermissionEnforcement: setting blockOwnerDeletion needs permission to
# update the owner's finalizers; a service account that may only create ConfigMaps is refused.
kubectl create role cm-creator -n "$ns" --verb=create,get --resource=configmaps >/dev/null
kubectl create rolebinding cm-creator -n "$ns" --role=cm-creator --serviceaccount="$ns":default >/dev/null
kubectl create configmap orp-owner -n "$ns" >/dev/null
uid=$(kubectl get configmap orp-owner -n "$ns" -o jsonpath='{.metadata.uid}')
orp_owned() { # <name> <blockOwnerDeletion>
  kubectl create -n "$ns" --as=system:serviceaccount:"$ns":default -f - 2>&1 <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: $1
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: orp-owner, uid: $uid, blockOwnerDeletion: $2}
EOF
}
out=$(orp_owned orp-plain false) || fail "service account could not create a ConfigMap (RBAC setup): $out"
if out=$(orp_owned orp-blocking true); then fail "blockOwnerDeletion was allowed without finalizers permission"; fi
[[ $out == *"cannot set blockOwnerDeletion"* ]] || fail "unexpected rejection: $out"
ok "OwnerReferencesPermissionEnforcement admission (blockOwnerDeletion refused without permission)"

# KubeRay reconciles a RayCluster: head Pod (Pending: no kubelet) and head Service.
kubectl apply -n "$ns" -f - >/dev/null <<'EOF'
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: tiny}
spec:
  headGroupSpec:
    rayStartParams: {}
    template:
      spec:
        containers:
        - name: ray-head
          image: rayproject/ray:2.46.0
          resources: {limits: {cpu: "1", memory: 1Gi}, requests: {cpu: "1", memory: 1Gi}}
EOF
retry 60 bash -c "kubectl get pods -n $ns -l ray.io/cluster=tiny,ray.io/node-type=head -o name | grep -q ." ||
  fail "KubeRay created no head Pod"
retry 60 bash -c "kubectl get svc -n $ns -l ray.io/cluster=tiny -o name | grep -q ." ||
  fail "KubeRay created no head Service"
ok "KubeRay: RayCluster -> head Pod $(kubectl get pods -n "$ns" -l ray.io/cluster=tiny -o jsonpath='{.items[0].metadata.name} ({.items[0].status.phase})') + Service $(kubectl get svc -n "$ns" -l ray.io/cluster=tiny -o jsonpath='{.items[0].metadata.name}')"

# Helm: client works, talks to the server, renders templates.
helm version --short >/dev/null && ok "helm version: $(helm version --short)"
chart=$(mktemp -d)
helm create "$chart/demo" >/dev/null
helm template demo "$chart/demo" | grep -q 'kind: Deployment' || fail "helm template"
helm template demo "$chart/demo" --dry-run=server -n "$ns" >/dev/null || fail "helm template --dry-run=server"
ok "helm template (offline and --dry-run=server against the API server)"
rm -rf "$chart"
echo "all checks passed"
