#!/usr/bin/env bash
# Build a real kube-apiserver (and optionally kube-controller-manager, kubectl) from
# the Go module proxy -- no git clone of kubernetes/kubernetes, no Docker.
#
# Usage: k8s/testenv/build-apiserver.sh [K8S_VERSION]   (default v1.37.2)
#   K8S_COMPONENTS="kube-apiserver kube-controller-manager kubectl"  (default: kube-apiserver)
#     each component is k8s.io/kubernetes/cmd/<component>
#   K8S_BIN_CACHE=~/.cache/image-pipeline/k8s               (binaries land in $K8S_BIN_CACHE/<version>/)
#
# How: k8s.io/kubernetes's go.mod replaces every k8s.io/<staging> module with
# ./staging/src/k8s.io/<x>; those replaces are ignored when kubernetes is a
# dependency, so a throw-away wrapper module re-declares them pointing at the
# published v0.<minor>.<patch> tags of the staging repos.
set -euo pipefail

K8S_VERSION="${1:-${K8S_VERSION:-v1.37.2}}"
COMPONENTS="${K8S_COMPONENTS:-kube-apiserver}"
CACHE="${K8S_BIN_CACHE:-$HOME/.cache/image-pipeline/k8s}"
OUTDIR="$CACHE/$K8S_VERSION"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"   # v1.37.2 -> v0.37.2

version_of() { # kubectl has no --version flag
  if [[ "$(basename "$1")" == kubectl ]]; then "$1" version --client 2>/dev/null | head -1; else "$1" --version 2>/dev/null; fi
}
missing=()
for c in $COMPONENTS; do
  if [[ -x "$OUTDIR/$c" ]]; then
    echo "cached: $OUTDIR/$c ($(version_of "$OUTDIR/$c" || true))"
  else
    missing+=("$c")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "$OUTDIR"
  exit 0
fi

command -v go >/dev/null || { echo "go not found" >&2; exit 1; }
mkdir -p "$OUTDIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/k8s-wrapper.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

echo ">> fetching k8s.io/kubernetes@$K8S_VERSION go.mod"
# (a Go older than the module's go line reports an error but has fetched the go.mod: go on)
KGOMOD="$({ go mod download -json "k8s.io/kubernetes@$K8S_VERSION" || true; } | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "$KGOMOD" ]] || { echo "could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
GOVER="$(awk '$1=="go"{print $2; exit}' "$KGOMOD")"
GODEBUG_LINE="$(grep -E '^godebug ' "$KGOMOD" || true)"
# staging modules = the "k8s.io/x => ./staging/..." replace lines
mapfile -t STAGING < <(awk '$2=="=>" && $3 ~ /^\.\/staging\// {print $1}' "$KGOMOD")
echo ">> ${#STAGING[@]} staging modules, mapping to $STAGING_VERSION (go $GOVER)"

# An older local Go (>= 1.21) fetches the go line's toolchain itself: GOTOOLCHAIN downloads
# the module golang.org/toolchain from the module proxy (go.env may say GOTOOLCHAIN=local).
older() { [[ "$1" != "$2" && "$(printf '%s\n' "$1" "$2" | sort -V | head -1)" == "$1" ]]; }
LOCAL_GO="$(go env GOVERSION)"; LOCAL_GO="${LOCAL_GO#go}"
if older "$LOCAL_GO" "$GOVER"; then
  if older "$LOCAL_GO" 1.21; then
    echo "go $LOCAL_GO cannot build k8s $K8S_VERSION (needs go >= $GOVER) nor fetch that toolchain (needs go >= 1.21)" >&2
    exit 1
  fi
  export GOTOOLCHAIN="go$GOVER"
  echo ">> local go $LOCAL_GO is older than $GOVER: using GOTOOLCHAIN=$GOTOOLCHAIN ($(go version))"
fi

{
  echo "module example.local/k8s-testenv-build"
  echo
  echo "go $GOVER"
  [[ -n "$GODEBUG_LINE" ]] && echo "$GODEBUG_LINE"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  for m in "${STAGING[@]}"; do echo "	$m => $m $STAGING_VERSION"; done
  echo ")"
} > go.mod

{
  echo "//go:build tools"
  echo
  echo "package tools"
  echo
  echo "import ("
  for c in "${missing[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
  echo ")"
} > tools.go

echo ">> go mod tidy"
GOFLAGS=-mod=mod go mod tidy

DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
LDF="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$MINOR"
  LDF+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$DATE -X $pkg.gitCommit=proxy-$K8S_VERSION"
done

for c in "${missing[@]}"; do
  echo ">> go build $c"
  CGO_ENABLED=0 go build -trimpath -ldflags "$LDF" -o "$OUTDIR/$c.tmp" "k8s.io/kubernetes/cmd/$c"
  mv "$OUTDIR/$c.tmp" "$OUTDIR/$c"
  echo "built: $OUTDIR/$c"
done
echo "$OUTDIR"
