#!/usr/bin/env bash
# Build (and push) the pipeline's container images, from the repository root as the build
# context (every Dockerfile copies the shared code it needs from there).
#
#   ./build_service.sh NAME [NAME...]   a task (blur, edge_detect, ...), monitor or orchestrator
#   ./build_service.sh --all            every image
#   ./build_service.sh --list           the names it knows
#   --no-push                           build only (e.g. for `kind load docker-image`)
#
# The image of NAME is ${IMAGE_REGISTRY:+$IMAGE_REGISTRY/}image-pipeline-NAME:${IMAGE_TAG:-0.6.0},
# the same reference the orchestrator's Kubernetes runtime starts (pipeline/settings.py): set
# IMAGE_REGISTRY and IMAGE_TAG as in the ConfigMap pipeline-settings (k8s/settings.yaml,
# `python -m pipeline deploy --image-registry/--image-tag`). Never `latest`: a moving tag makes
# a retried task run other code than its first attempt. DOCKER=podman works too.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

# Kept equal to pipeline/__init__.py's __version__ and k8s/settings.yaml's IMAGE_TAG
# (tests/unit/test_images.py checks).
DEFAULT_TAG=0.6.0
tag="${IMAGE_TAG:-$DEFAULT_TAG}"
registry="${IMAGE_REGISTRY:-}"
registry="${registry%/}"
docker="${DOCKER:-docker}"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

# Every image: each task with a Dockerfile under services/ (the catalog's tasks), then the
# monitor and the orchestrator.
known() {
  local dockerfile
  for dockerfile in services/*/Dockerfile; do
    basename "$(dirname "$dockerfile")"
  done
  echo monitor
  echo orchestrator
}

dockerfile_of() {
  case "$1" in
    monitor|orchestrator) echo "$1/Dockerfile" ;;
    *) echo "services/$1/Dockerfile" ;;
  esac
}

push=1
names=()
for arg in "$@"; do
  case "$arg" in
    --no-push) push=0 ;;
    --all) while read -r name; do names+=("$name"); done < <(known) ;;
    --list) known; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "build_service.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) names+=("${arg//-/_}") ;;   # task edge-detect lives in services/edge_detect
  esac
done
if [ ${#names[@]} -eq 0 ]; then usage >&2; exit 2; fi

if [ "$tag" = latest ]; then
  echo "build_service.sh: IMAGE_TAG=latest: give an explicit version tag, e.g. $DEFAULT_TAG" >&2
  exit 2
fi
all=()
while read -r name; do all+=("$name"); done < <(known)
for name in "${names[@]}"; do
  found=0
  for candidate in "${all[@]}"; do [ "$candidate" = "$name" ] && found=1; done
  if [ "$found" = 0 ]; then
    echo "build_service.sh: unknown image '$name'; known: ${all[*]}" >&2
    exit 2
  fi
done
if ! command -v "$docker" >/dev/null 2>&1; then
  echo "build_service.sh: '$docker' not found: install Docker (or set DOCKER=podman)" >&2
  exit 2
fi

for name in "${names[@]}"; do
  image="${registry:+$registry/}image-pipeline-$name:$tag"
  echo ">> $image ($(dockerfile_of "$name"))"
  "$docker" build -f "$(dockerfile_of "$name")" -t "$image" .
  if [ "$push" = 1 ]; then
    "$docker" push "$image"
  fi
done
