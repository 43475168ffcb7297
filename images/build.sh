#!/usr/bin/env bash
# `make images` and `make base-image`: build the project's images with docker, podman or buildah,
# whichever works here, every pin from images/images.env. Built for machines that reach only PyPI
# and a Debian mirror (air-gapped or proxied): the Python base falls back to one bootstrapped from
# Debian's archive (images/base-image.sh) when the upstream one cannot be pulled, and the proxy's CA
# bundle and a local wheelhouse reach the build as a secret and a build context, never as a layer.
#
# Usage: images/build.sh [base|cpu|trainer]...   (default: cpu trainer)
# Environment: ENGINE (docker|podman|buildah; default: the first that works), BASE (auto: upstream
# when it can be pulled, else Debian; upstream; debian), CA_BUNDLE (default: the system bundle),
# WHEELHOUSE (a folder of wheels; default: pip's find-links, if any).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. images/images.env

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  for e in docker podman; do
    # a docker CLI without a daemon is common: `info` tells
    if command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1; then engine=$e; break; fi
  done
fi
if [ -z "$engine" ] && command -v buildah >/dev/null 2>&1; then engine=buildah; fi
if [ -z "$engine" ]; then
  echo "images: no working container engine (docker or podman with a running daemon, or buildah)" >&2; exit 1
fi

image_exists() {
  if [ "$engine" = buildah ]; then buildah inspect --type image "$1" >/dev/null 2>&1
  else "$engine" image inspect "$1" >/dev/null 2>&1; fi
}

bootstrap_base() {
  image_exists "$PYTHON_BOOTSTRAP_IMAGE" && return 0
  local import_engine=$engine
  [ "$engine" = buildah ] && import_engine=podman  # buildah has no import: podman shares its storage
  echo "images: bootstrapping $PYTHON_BOOTSTRAP_IMAGE from $DEBIAN_MIRROR ($DEBIAN_SUITE)" >&2
  images/base-image.sh "$import_engine" "$PYTHON_BOOTSTRAP_IMAGE" "$DEBIAN_SUITE" "$DEBIAN_MIRROR"
}

python_base() {
  case "${BASE:-auto}" in
    upstream) echo "$PYTHON_BASE_IMAGE" ;;
    debian) bootstrap_base >&2; echo "$PYTHON_BOOTSTRAP_IMAGE" ;;
    auto)
      if image_exists "$PYTHON_BASE_IMAGE" || timeout 120 "$engine" pull "$PYTHON_BASE_IMAGE" >&2; then
        echo "$PYTHON_BASE_IMAGE"
      else
        echo "images: $PYTHON_BASE_IMAGE cannot be pulled; using the Debian-bootstrapped base" >&2
        bootstrap_base >&2; echo "$PYTHON_BOOTSTRAP_IMAGE"
      fi ;;
    *) echo "images: BASE=${BASE} (expected auto, upstream or debian)" >&2; exit 2 ;;
  esac
}

ca_bundle=${CA_BUNDLE:-}
if [ -z "$ca_bundle" ]; then
  for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [ -f "$f" ]; then ca_bundle=$f; break; fi
  done
fi
[ -f "$ca_bundle" ] || { echo "images: no CA bundle found; set CA_BUNDLE=FILE (PEM)" >&2; exit 1; }
wheelhouse=${WHEELHOUSE-$(python3 -m pip config get global.find-links 2>/dev/null | awk '{print $1}' || true)}
if [ -z "$wheelhouse" ] || [ ! -d "$wheelhouse" ]; then wheelhouse=build/empty-wheelhouse; mkdir -p "$wheelhouse"; fi

build() {  # build NAME DOCKERFILE TAG
  local dockerfile=$2 tag=$3 args=() started
  for a in $(sed -n 's/^ARG \([A-Z_][A-Z0-9_]*\).*/\1/p' "$dockerfile" | sort -u); do
    if [ "$a" = PYTHON_BASE_IMAGE ]; then args+=(--build-arg "$a=$PY_BASE"); else args+=(--build-arg "$a=${!a}"); fi
  done
  started=$(date +%s)
  local format=(); [ "$engine" = docker ] || format=(--format docker)  # OCI format drops SHELL, HEALTHCHECK
  (set -x; "$engine" build "${format[@]}" -f "$dockerfile" "${args[@]}" --secret "id=ca,src=$ca_bundle" \
     --build-context "wheelhouse=$wheelhouse" -t "$tag" .)
  echo "images: built $tag ($1) in $(( $(date +%s) - started ))s" >&2
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu trainer)
for t in "${targets[@]}"; do
  case "$t" in
    base) BASE=debian python_base >/dev/null ;;
    cpu) PY_BASE=${PY_BASE:-$(python_base)}; build cpu images/Dockerfile.cpu "$CPU_IMAGE" ;;
    trainer) PY_BASE=${PY_BASE:-$(python_base)}; build trainer images/Dockerfile.trainer "$TRAINER_IMAGE" ;;
    *) echo "images: unknown target $t (base, cpu or trainer)" >&2; exit 2 ;;
  esac
done
