#!/usr/bin/env bash
# Build an etcd server binary from the Go module proxy (for when Debian's
# etcd-server package is too old for the kube-apiserver in use).
#
# Usage: k8s/testenv/build-etcd.sh [ETCD_VERSION]   (default v3.6.16)
# Output: $K8S_BIN_CACHE/etcd-<version>/etcd, plus symlink $K8S_BIN_CACHE/etcd -> etcd-<version>
set -euo pipefail

ETCD_VERSION="${1:-${ETCD_VERSION:-v3.6.16}}"
CACHE="${K8S_BIN_CACHE:-$HOME/.cache/image-pipeline/k8s}"
OUTDIR="$CACHE/etcd-$ETCD_VERSION"
if [[ -x "$OUTDIR/etcd" ]]; then
  echo "cached: $OUTDIR/etcd ($("$OUTDIR/etcd" --version | head -1))"
  ln -sfn "etcd-$ETCD_VERSION" "$CACHE/etcd"
  echo "$OUTDIR/etcd"; exit 0
fi
mkdir -p "$OUTDIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/etcd-wrapper.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# go.etcd.io/etcd/server/v3 has relative `replace` lines in its go.mod, so
# `go install ...@version` refuses it; a wrapper module avoids that (replaces
# of dependencies are ignored, the published sibling modules are used).
cat > go.mod <<MOD
module example.local/etcd-testenv-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
GOFLAGS=-mod=mod go mod tidy
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUTDIR/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$OUTDIR/etcd.tmp" "$OUTDIR/etcd"
ln -sfn "etcd-$ETCD_VERSION" "$CACHE/etcd"
echo "built: $OUTDIR/etcd ($("$OUTDIR/etcd" --version | head -1))"
